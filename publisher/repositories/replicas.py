"""The replicas this host keeps: where each is pulled from, its lock, its record, its freshness.

A ``cvmfs-native`` repository published by another server and given a ``replica`` directory
here is a stratum 1 that ``userpub replicator`` keeps fresh (:mod:`.cvmfs_native.replica`).
A ``cvmfs-server`` repository published elsewhere with a ``replica`` here is a stratum 1 of
cvmfs_server's own (``userpub initrepos`` made it) that the replicator refreshes with
``cvmfs_server snapshot``. Either record ``<state>/replicas/<name>.json`` says which
revision it serves and when the last pull succeeded; :func:`replica_freshness` reads it from
any process (the janitor refuses to judge ages on a stale replica; the metrics report the age).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from publisher.repositories.cvmfs_native.replica import Origin
from publisher.repositories.cvmfs_native.replica_state import ReplicaState, state_file
from userpub.config import Config, RepositoryConfig

__all__ = ["ReplicaTarget", "refreshed_here", "replica_freshness", "replica_lock_path",
           "replica_master_key", "replica_origin", "replica_staleness", "replica_state_path",
           "replica_targets", "replicas_here", "snapshot_replicas"]


@dataclass(frozen=True)
class ReplicaTarget:
    """One replica to pull: the repository, its directory, origin, record and lock."""

    repository: RepositoryConfig
    root: Path
    origin: Origin
    state: Path
    lock: Path

    @property
    def name(self) -> str:
        """The repository name."""
        return self.repository.name


def replicas_here(config: Config) -> tuple[RepositoryConfig, ...]:
    """The cvmfs-native repositories published elsewhere with a replica on this host."""
    return tuple(r for r in config.repositories
                 if r.replica is not None and r.backend == "cvmfs-native"
                 and not r.is_hosted_on(config.server.name))


def snapshot_replicas(config: Config) -> tuple[RepositoryConfig, ...]:
    """The cvmfs-server repositories published elsewhere whose stratum-1 replica here is
    refreshed by ``cvmfs_server snapshot`` (those with an origin to snapshot from)."""
    return tuple(r for r in config.repositories
                 if r.replica is not None and r.backend == "cvmfs-server"
                 and not r.is_hosted_on(config.server.name)
                 and replica_origin(config, r) is not None)


def refreshed_here(config: Config, repo: RepositoryConfig) -> bool:
    """True when this host's replicator keeps the replica of ``repo`` fresh."""
    if repo in snapshot_replicas(config):
        return True
    return repo in replicas_here(config) and replica_origin(config, repo) is not None


def replica_origin(config: Config, repo: RepositoryConfig) -> str | None:
    """The stratum-0 URL (``http://host:port/cvmfs/<name>``) a replica of ``repo`` is pulled
    from, or None when none is configured (the replica is then only read).

    The one place that decides it: the repository's ``origin`` if set, else the ``stratum0``
    URL of the peer that hosts it, followed by ``/<name>``.
    """
    if repo.origin:
        return repo.origin.rstrip("/")
    try:
        peer = config.peer(repo.host)
    except KeyError:
        return None
    return f"{peer.stratum0}/{repo.name}" if peer.stratum0 else None


def replica_master_key(config: Config, repo: RepositoryConfig) -> Path:
    """The origin's master public key: ``master_key``, else ``<state>/keys/<name>.pub``."""
    return repo.master_key or config.server.state / "keys" / f"{repo.name}.pub"


def replica_state_path(config: Config, name: str) -> Path:
    """``<state>/replicas/<name>.json``."""
    return state_file(config.server.state / "replicas", name)


def replica_lock_path(config: Config, name: str) -> Path:
    """The lock held while a replica is pulled or collected."""
    return config.lock_dir / f"{name}.replica.lock"


def replica_targets(config: Config) -> list[ReplicaTarget]:
    """Every replica this host pulls (those with an origin), in configuration order."""
    targets = []
    for repo in replicas_here(config):
        url = replica_origin(config, repo)
        if url is None:
            continue
        assert repo.replica is not None
        targets.append(ReplicaTarget(repo, repo.replica,
                                     Origin(url, repo.name, replica_master_key(config, repo)),
                                     replica_state_path(config, repo.name),
                                     replica_lock_path(config, repo.name)))
    return targets


def replica_freshness(config: Config, repo: RepositoryConfig | str, now: float | None = None
                      ) -> tuple[int, float] | None:
    """(revision served, seconds since the last successful pull) of a replica kept here, or
    None when it was never pulled successfully (or has no record)."""
    name = repo if isinstance(repo, str) else repo.name
    state = ReplicaState.load(replica_state_path(config, name), name)
    age = state.age(time.time() if now is None else now)
    return None if age is None else (state.revision, age)


def replica_staleness(config: Config, repo: RepositoryConfig) -> float | None:
    """Seconds since the replica of ``repo`` was last refreshed here (infinity: never), or
    None when this host does not refresh it (a copy someone else keeps fresh)."""
    if not refreshed_here(config, repo):
        return None
    fresh = replica_freshness(config, repo)
    return float("inf") if fresh is None else fresh[1]
