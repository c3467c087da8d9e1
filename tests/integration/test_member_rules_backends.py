"""The tar-member rules, tested once against every backend.

Every hostile archive of ``tests/hostile.py`` is refused by the local, cvmfs-server (unpack and
``cvmfs_server ingest`` modes, against the double) and cvmfs-native backends with the
unpacker's message, nothing becomes visible and nothing outside the CID directory changes;
every archive whose symlinks lead out of the CID directory is stored with those symlinks as
they are (GNU tar's behaviour), and the publisher's own ``.publisher`` record is its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from publisher.repositories import CvmfsServerRepository, LocalRepository
from publisher.repositories.cvmfs_native import NativeRepository, init_keys
from publisher.tarball import UnpackError, UnpackLimits
from publisher.tarball.unpack import unpack
from tests.hostile import (
    CASE_LIMITS,
    EXPECTED_ERRORS,
    HOSTILE_CASES,
    KEPT_CASES,
    KEPT_SYMLINKS,
    SENTINEL,
)
from tests.unit.test_cvmfs_native_invariants import check_repository

REPO = "repo1.example.org"
BACKENDS = ("local", "cvmfs-server", "cvmfs-server-ingest", "cvmfs-native")


@dataclass
class Backend:
    """One repository of a backend, and how to read a published CID back."""

    kind: str
    repo: LocalRepository | CvmfsServerRepository | NativeRepository
    published: Path | None  # the published tree (None: cvmfs-native, read by its catalogs)

    def symlinks(self, cid: str) -> dict[str, str]:
        """path below the CID -> target, for every symlink of the published CID."""
        if self.published is None:
            checked = check_repository(self.repo.root)  # type: ignore[union-attr]
            base = f"/sw/{cid}/".encode()
            return {p[len(base):].decode(): t.decode() for p, t in checked.links.items()
                    if p.startswith(base)}
        top = self.published / "sw" / cid
        return {str(p.relative_to(top)): str(p.readlink()) for p in top.rglob("*")
                if p.is_symlink()}

    def file(self, cid: str, path: str) -> bytes | None:
        """A regular file of the published CID (None: not there)."""
        if self.published is None:
            checked = check_repository(self.repo.root)  # type: ignore[union-attr]
            return checked.files.get(f"/sw/{cid}/{path}".encode())
        full = self.published / "sw" / cid / path
        return full.read_bytes() if full.is_file() and not full.is_symlink() else None


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Iterator[Backend]:
    kind = request.param
    if kind == "local":
        root = tmp_path / "repo"
        root.mkdir()  # the operator makes a repository's root; the publisher never does
        repo = LocalRepository(REPO, root, "sw", "ts", f"/cvmfs/{REPO}", durable=False)
        repo.ensure_layout()
        yield Backend(kind, repo, root)
    elif kind.startswith("cvmfs-server"):
        double = request.getfixturevalue("cvmfs_double")
        double.mkfs(REPO)
        repo = CvmfsServerRepository(REPO, double.mount(REPO), double.published(REPO), "sw",
                                     "ts", timeout=30, ingest=kind.endswith("ingest"))
        yield Backend(kind, repo, double.published(REPO))
    else:
        keys = init_keys(tmp_path / "keys", REPO)
        repo = NativeRepository(REPO, tmp_path / "srv" / REPO, "sw", "ts", f"/cvmfs/{REPO}",
                                keys=keys, durable=False, keep_hours=0)
        repo.recover()
        yield Backend(kind, repo, None)


def _sentinel(tmp_path: Path) -> Path:
    """``<published>/../sentinel``-style target of the attacks: a directory beside everything."""
    sentinel = tmp_path / SENTINEL
    sentinel.mkdir(exist_ok=True)
    (sentinel / "secret").write_text("keep")
    return sentinel


def _untouched(sentinel: Path) -> None:
    assert [p.name for p in sentinel.iterdir()] == ["secret"]
    assert (sentinel / "secret").read_text() == "keep"


@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_archives_are_refused_alike_by_every_backend(backend, tmp_path, case):
    sentinel = _sentinel(tmp_path)
    src = HOSTILE_CASES[case](tmp_path)
    limits = UnpackLimits(**CASE_LIMITS.get(case, {}))
    with pytest.raises(UnpackError) as unpacked:
        unpack(src, tmp_path / "dest", limits)
    shutil.rmtree(tmp_path / "dest", ignore_errors=True)
    with backend.repo.transaction() as txn, pytest.raises(UnpackError) as refused:
        txn.add("grp/bad", src, "mallory", limits)
    assert EXPECTED_ERRORS[case] in str(refused.value)
    assert str(refused.value) == str(unpacked.value)  # one rule, one message
    assert not backend.repo.contains("grp/bad")
    _untouched(sentinel)


@pytest.mark.parametrize("case", sorted(KEPT_CASES))
def test_symlinks_out_of_the_cid_are_kept_by_every_backend(backend, tmp_path, case):
    sentinel = _sentinel(tmp_path)
    src = KEPT_CASES[case](tmp_path)
    with backend.repo.transaction() as txn:
        txn.add("grp/kept", src, "alice", UnpackLimits())
    assert backend.repo.contains("grp/kept")
    links = backend.symlinks("grp/kept")
    assert links == KEPT_SYMLINKS[case]
    assert backend.file("grp/kept", ".publisher") == b"alice\n"  # ours, not the user's
    assert backend.file("grp/kept", ".cvmfscatalog") == b""
    if case == "reserved_names":
        assert backend.file("grp/kept", "sub/.publisher") == b"kept"  # only the top is ours
        assert backend.file("grp/kept", ".publisher/inside") is None
    _untouched(sentinel)
