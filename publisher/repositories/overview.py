"""One line per configured repository for ``userpub status`` without a CID: where it is
published, what this host holds of it, and how fresh a replica is."""

from __future__ import annotations

import time

from publisher.repositories import open_reader
from publisher.repositories.cvmfs_native.reader import NativeReader
from publisher.repositories.replicas import refreshed_here, replica_freshness
from userpub.config import Config, RepositoryConfig

__all__ = ["repository_lines"]


def repository_lines(config: Config, now: float | None = None) -> list[str]:
    """``<name>: <role>; <what is served>`` for every repository, in configuration order.

    A replica this host refreshes shows its revision and the age of its last successful
    pull, marked ``STALE`` beyond ``[pair] replica_max_age_seconds`` (the janitor then
    removes nothing).
    """
    now = time.time() if now is None else now
    return [f"{repo.name}: {_describe(config, repo, now)}" for repo in config.repositories]


def _describe(config: Config, repo: RepositoryConfig, now: float) -> str:
    here = repo.is_hosted_on(config.server.name)
    role = (f"published here ({repo.backend})" if here
            else f"published by {repo.host} ({repo.backend})")
    reader = open_reader(config, repo)
    problem = reader.unreadable()
    if not here and refreshed_here(config, repo):
        fresh = replica_freshness(config, repo, now)
        if fresh is None:
            return f"{role}; replica {repo.replica} never pulled"
        revision, age = fresh
        stale = " STALE" if age > config.pair.replica_max_age_seconds else ""
        return f"{role}; replica at revision {revision}, pulled {age:.0f} s ago{stale}"
    if problem is not None:
        return f"{role}; unreadable: {problem}"
    if isinstance(reader, NativeReader) and (manifest := reader.manifest()) is not None:
        return f"{role}; revision {manifest.revision}"
    where = "read at" if here or repo.replica is None else "replica read at"
    return f"{role}; {where} {getattr(reader, 'root', repo.mount)}"
