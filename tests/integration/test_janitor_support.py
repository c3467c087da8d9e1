"""Support for the janitor's integration tests (no tests here): a site of local repositories
whose CIDs are published through the real backend and then aged with ``os.utime``."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from publisher.repositories import LocalRepository, open_repository
from publisher.tarball import UnpackLimits
from spool import Spool
from tests.helpers import make_tarball, write_config
from userpub.config import Config, load_config

DAY = 86400.0
REPO1, REPO2 = "repo1.example.org", "repo2.example.org"
FILES = {"bin/run.sh": b"#!/bin/sh\necho hi\n", "lib/a/b/data.txt": b"d" * 3000,
         "lib/a/c.txt": b"c", "README": b"readme"}


class Site:
    """A configuration plus ready local repositories and spool under ``directory``."""

    def __init__(self, directory: Path, repos: int = 2, *, extra: str = "",
                 hosts: Mapping[int, str] | None = None) -> None:
        self.directory = directory
        self.path = write_config(directory, repos, extra=extra, hosts=hosts)
        self.config: Config = load_config(self.path)
        for repo in self.config.repositories:
            assert repo.root is not None
            for sub in ("sw", "ts", ".userpub/staging", ".userpub/trash"):
                (repo.root / sub).mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.config.server.spool)
        self.spool.ensure_layout()
        self._tarballs: dict[str, Path] = {}

    def repo(self, name: str) -> LocalRepository:
        repository = open_repository(self.config, self.config.repository(name))
        assert isinstance(repository, LocalRepository)
        return repository

    def root(self, name: str) -> Path:
        root = self.config.repository(name).root
        assert root is not None
        return root

    def tarball(self, files: Mapping[str, bytes]) -> Path:
        key = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
        if key not in self._tarballs:
            self._tarballs[key] = make_tarball(self.directory / f"{key}.tar.gz", files)
        return self._tarballs[key]

    def publish(self, name: str, cids: Iterable[str], *, age_days: float | None = None,
                files: Mapping[str, bytes] = FILES) -> None:
        """Publish ``cids`` through a real transaction, then date them ``age_days`` back."""
        cids = list(cids)
        tarball = self.tarball(files)
        with self.repo(name).transaction() as txn:
            for cid in cids:
                txn.add(cid, tarball, "tester", UnpackLimits())
        if age_days is not None:
            for cid in cids:
                self.set_published(name, cid, age_days)

    def set_published(self, name: str, cid: str, age_days: float) -> None:
        when = time.time() - age_days * DAY
        os.utime(self.root(name) / "sw" / cid / ".publisher", (when, when))

    def stamp(self, name: str, cids: Iterable[str], age_days: float) -> None:
        """Stamp ``cids`` in repository ``name`` (whether or not it holds them), dated back."""
        cids = list(cids)
        with self.repo(name).transaction() as txn:
            txn.stamp(cids, "tester")
        when = time.time() - age_days * DAY
        for cid in cids:
            os.utime(self.root(name) / "ts" / cid, (when, when))

    def cids(self, name: str) -> set[str]:
        return set(self.repo(name).cids())

    def stamps(self, name: str) -> set[str]:
        return set(self.repo(name).stamps())

    def trash_is_empty(self, name: str) -> bool:
        return not any((self.root(name) / ".userpub/trash").iterdir())


def cid_listing(root: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every entry under one CID directory; directories size -1."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            out.append((os.path.relpath(full, root), -1 if stat.S_ISDIR(st.st_mode)
                        else st.st_size))
    return sorted(out)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``root``: type, mode, size, mtime and content digest of each entry."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(full)
            out[os.path.relpath(full, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out
