"""Repository backends behind one protocol; :func:`open_repository` picks one by configuration."""

from __future__ import annotations

import shutil
from pathlib import Path

from publisher.repositories.base import (
    GcResult,
    RemoveResult,
    Repository,
    RepositoryError,
    RepositoryReader,
    Transaction,
)
from publisher.repositories.cvmfs_server import CvmfsServerRepository, default_published_view
from publisher.repositories.cvmfs_server.repository import COMMAND as CVMFS_SERVER
from publisher.repositories.local import LocalRepository
from publisher.repositories.tree import TreeReader
from userpub.config import Config, RepositoryConfig

__all__ = ["CvmfsServerRepository", "GcResult", "LocalRepository", "RemoveResult", "Repository",
           "RepositoryError", "RepositoryReader", "Transaction", "TreeReader", "backend_problems",
           "open_reader", "open_repository"]


def open_repository(config: Config, repo: RepositoryConfig) -> Repository:
    """The writable backend of a repository hosted on this server."""
    if repo.backend == "local":
        assert repo.root is not None  # validated by the configuration
        return LocalRepository(repo.name, repo.root, config.server.prefix, config.server.stamps,
                               repo.mount, durable=config.publisher.durable)
    if repo.backend == "cvmfs-server":
        return CvmfsServerRepository(
            repo.name, Path(repo.mount), repo.root or default_published_view(repo.name),
            config.server.prefix, config.server.stamps, timeout=repo.command_timeout,
            ingest=repo.cvmfs_ingest)
    if repo.backend == "cvmfs-native":
        from publisher.repositories.cvmfs_native import open_native

        return open_native(config, repo)
    raise NotImplementedError(f"backend {repo.backend!r} is not available yet")


def backend_problems(config: Config, repo: RepositoryConfig) -> list[str]:
    """What the backend of a repository published here lacks to start (one line each):
    ``cvmfs_server`` on PATH, or the keys of a cvmfs-native repository. Read-only."""
    if repo.backend == "cvmfs-server" and shutil.which(CVMFS_SERVER) is None:
        return [f"repository {repo.name}: {CVMFS_SERVER} not found on PATH (the cvmfs-server "
                "backend runs it)"]
    if repo.backend == "cvmfs-native":
        from publisher.repositories.cvmfs_native import KeysError, key_files, load_keys

        try:
            load_keys(key_files(config, repo))
        except KeysError as err:
            return [f"repository {repo.name}: {err}"]
    return []


def open_reader(config: Config, repo: RepositoryConfig) -> RepositoryReader:
    """The read-only view of any configured repository.

    A replica (``replica = "/cvmfs2/<repo>"``) is read where configured: a cvmfs-native one
    is a stratum 1 read in place by its catalogs, any other a plain tree; its staleness is
    that of the replicator's record when this host refreshes it; otherwise the
    repository's own tree: ``root`` for the local backend; for cvmfs-server the published
    revision (``root``, default ``/var/spool/cvmfs/<repo>/rdonly``) where hosted here, the
    ``mount`` elsewhere.
    """
    prefix, stamps = config.server.prefix, config.server.stamps
    if repo.replica is not None and not repo.is_hosted_on(config.server.name):
        from publisher.repositories.replicas import replica_staleness

        def staleness() -> float | None:
            return replica_staleness(config, repo)

        if repo.backend == "cvmfs-native":
            from publisher.repositories.cvmfs_native import NativeReader

            return NativeReader(repo.name, repo.replica, prefix, stamps, repo.mount,
                                replica=True, staleness=staleness)
        return TreeReader(repo.name, repo.replica, prefix, stamps, repo.mount,
                          staleness=staleness)
    if repo.backend == "local" and repo.root is not None:
        return TreeReader(repo.name, repo.root, prefix, stamps, repo.mount)
    if repo.backend == "cvmfs-native" and repo.root is not None \
            and repo.is_hosted_on(config.server.name):
        from publisher.repositories.cvmfs_native import NativeReader

        return NativeReader(repo.name, repo.root, prefix, stamps, repo.mount)
    if repo.backend == "cvmfs-server" and repo.is_hosted_on(config.server.name):
        # the published revision (cvmfs_server's rdonly mount), never the union mount,
        # which shows the uncommitted changes of an open transaction
        published = repo.root or default_published_view(repo.name)
        return TreeReader(repo.name, published, prefix, stamps, repo.mount)
    return TreeReader(repo.name, Path(repo.mount), prefix, stamps, repo.mount)
