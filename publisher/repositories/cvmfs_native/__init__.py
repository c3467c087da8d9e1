"""The ``cvmfs-native`` backend: a genuine CernVM-FS stratum 0 written by us (no cvmfs_server).

Entry points: :func:`open_native` (the writable repository of a configuration),
:class:`NativeReader` (the catalog view), :func:`init_keys` (``userpub keys init``) and
:func:`key_files` (where a repository's keys live). See ``docs/cvmfs-native.md``.
"""

from __future__ import annotations

from publisher.repositories.cvmfs_native.keys import KeyFiles, KeysError, init_keys, load_keys
from publisher.repositories.cvmfs_native.reader import NativeReader
from publisher.repositories.cvmfs_native.repository import NativeRepository
from userpub.config import Config, RepositoryConfig

__all__ = ["KeyFiles", "KeysError", "NativeReader", "NativeRepository", "init_keys", "key_files",
           "load_keys", "open_native"]


def key_files(config: Config, repo: RepositoryConfig) -> KeyFiles:
    """The repository's key files: ``keys`` if configured, else ``<state>/keys``."""
    return KeyFiles(repo.keys or config.server.state / "keys", repo.name)


def open_native(config: Config, repo: RepositoryConfig) -> NativeRepository:
    """The writable cvmfs-native repository ``repo`` (its ``root`` is the stratum 0)."""
    assert repo.root is not None  # validated by the configuration
    return NativeRepository(repo.name, repo.root, config.server.prefix, config.server.stamps,
                            repo.mount, keys=key_files(config, repo),
                            whitelist_days=repo.whitelist_days, keep_hours=repo.gc_keep_hours,
                            durable=config.publisher.durable)
