"""``userpub recompress``: a repository written before issue 20 (ISA-L objects) reaches the form
the genuine tools accept, without ever showing readers a revision with a missing object.

The repository is ``tests/fixtures/isal-repository.tar.xz``, written by the publisher itself at
the last commit with the old compression (see ``tests/fixtures/make_isal_repository.py``).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest

from publisher.repositories.cvmfs_native import KeyFiles, NativeRepository
from publisher.repositories.cvmfs_native.gc import reachable
from publisher.tarball.unpack import UnpackLimits
from tests.cvmfs_genuine import (
    TOOLS,
    assert_genuine_clean,
    genuine_tools,
    run_verify_sh,
    tools_present,
)
from tests.helpers import REPO_ROOT, make_tarball, run_userpub, write_config
from tests.unit.test_cvmfs_native_invariants import check_repository, manifest_fields
from tests.unit.test_cvmfs_native_repository import reachable_now, stored_now
from tests.unit.test_cvmfs_native_stratum0 import userpub

FQRN = "old.example.org"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "isal-repository.tar.xz"
OLD_REVISION = 6


def old_site(tmp: Path) -> tuple[Path, Path, Path]:
    """The fixture unpacked below ``tmp`` and a configuration hosting it: (config, root, key)."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp, filter="tar")
    root = tmp / "srv" / FQRN
    block = f"""
[[repository]]
name = "{FQRN}"
host = "pub1"
backend = "cvmfs-native"
root = "{root}"
mount = "/cvmfs/{FQRN}"
keys = "{tmp / 'keys'}"
gc_keep_hours = 0
"""
    return write_config(tmp / "site", repos=0, extra=block), root, tmp / "keys" / f"{FQRN}.pub"


def native(config: Path, root: Path, keep_hours: float = 0) -> NativeRepository:
    return NativeRepository(FQRN, root, "sw", "ts", f"/cvmfs/{FQRN}",
                            keys=KeyFiles(config.parent.parent / "keys", FQRN), durable=False,
                            keep_hours=keep_hours)


def verify(root: Path, key: Path, *extra: str) -> str:
    done = userpub("verify", str(root), "--key", str(key), *extra, check=False)
    return done.stdout.decode()


def snapshot(root: Path) -> tuple[object, ...]:
    """What a client sees in the current revision: files, links, directories, modes, times."""
    seen = check_repository(root)
    return seen.files, seen.links, seen.dirs, seen.modes, seen.mtimes


def test_recompress_brings_an_old_repository_to_the_genuine_form(tmp_path, caplog):
    config, root, key = old_site(tmp_path)
    before = verify(root, key)
    assert "not stored as zlib's default deflate" in before and "\nFAILED: " in before, before
    assert verify(root, key, "--no-recompress").startswith("ok: ")
    repo = native(config, root)
    repo.recover()
    assert "run `userpub recompress old.example.org`" in caplog.text
    assert not repo.uses_genuine_compression()
    content = snapshot(root)
    old_root, published = manifest_fields(root)["C"], int(manifest_fields(root)["T"])

    out = run_userpub(config, "recompress", FQRN, "--processes", "2").stdout
    assert f"published revision {OLD_REVISION + 1}:" in out, out
    assert int(manifest_fields(root)["S"]) == OLD_REVISION + 1
    assert snapshot(root) == content  # the same tree, in other objects
    assert repo.uses_genuine_compression()
    current = verify(root, key, "--current-only")
    assert current.startswith("ok: ") and "older tagged" not in current, current
    full = verify(root, key)  # the old revisions stay, complete, for their readers
    assert full.startswith("ok: ") and "only older tagged revisions use" in full, full
    kept = reachable(repo.store, [old_root])
    assert all(repo.store.path(n[:40], n[40:]).exists() for n in kept)
    assert "nothing to do" in run_userpub(config, "recompress", FQRN).stdout
    assert int(manifest_fields(root)["S"]) == OLD_REVISION + 1
    if not tools_present():
        warnings.warn(f"genuine CernVM-FS tools not found in {TOOLS}", stacklevel=1)
    else:
        pairs = {"/sw/grp/a": tmp_path / "tarballs" / "a.tar.gz",
                 "/sw/grp/b": tmp_path / "tarballs" / "b.tar.gz",
                 "/sw/late": tmp_path / "tarballs" / "late.tar.gz"}
        assert_genuine_clean(run_verify_sh(root, FQRN, key, tmp_path / "genuine", pairs))

    with repo.transaction() as txn:
        txn.add("new", make_tarball(tmp_path / "n.tgz", {"f": b"new\n"}), "me", UnpackLimits())
    # a window that excludes when the old revision was published, not when it was replaced:
    windowed = native(config, root, keep_hours=(time.time() - published) / 2 / 3600)
    windowed.gc()  # it was current until the recompress: kept like a recent publish
    assert all(repo.store.path(n[:40], n[40:]).exists() for n in kept)
    assert verify(root, key).startswith("ok: ")
    repo.gc()  # past the window (here: none): the old revisions and their objects go
    full = verify(root, key)
    assert full.startswith("ok: ") and "older tagged" not in full, full
    assert stored_now(repo) == reachable_now(repo)
    assert not any(repo.store.path(n[:40], n[40:]).exists() for n in kept - reachable_now(repo))


def test_the_old_repository_fails_the_genuine_tools_before(tmp_path):
    genuine_tools()
    _, root, key = old_site(tmp_path)
    verdict = run_verify_sh(root, FQRN, key, tmp_path / "genuine")
    assert {"scrub_s1", "check_s1_http"} <= set(verdict.failed()), verdict.output


CRASH = """
import os, sys
from publisher.repositories.cvmfs_native import layout, migrate, objects, publish
from userpub.cli import main
point, count = sys.argv[1], int(sys.argv[2])
targets = {"put": (objects.ObjectStore, "put"), "seal": (publish.RevisionWriter, "seal"),
           "install": (layout.Layout, "install"),
           "switched": (layout.Layout, "prune_generations")}
owner, name = targets[point]
original = getattr(owner, name)
calls = []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) >= count:
        os._exit(9)  # as kill -9: no clean-up of any kind
    return original(*args, **kwargs)
setattr(owner, name, dying)
sys.exit(main(["--config", sys.argv[3], "recompress", sys.argv[4], "--processes", "0"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("point", "count"), [("put", 1), ("put", 12), ("seal", 1),
                                               ("install", 1), ("switched", 1)])
def test_a_killed_recompress_leaves_a_complete_revision(tmp_path, point, count):
    config, root, key = old_site(tmp_path)
    content = snapshot(root)
    done = subprocess.run([sys.executable, "-c", CRASH, point, str(count), str(config), FQRN],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 9, done.stderr
    revision = int(manifest_fields(root)["S"])
    assert revision == (OLD_REVISION + 1 if point == "switched" else OLD_REVISION)
    assert verify(root, key, "--no-recompress").startswith("ok: ")  # nothing missing anywhere
    assert snapshot(root) == content
    out = run_userpub(config, "recompress", FQRN).stdout
    assert ("nothing to do" in out) == (point == "switched"), out
    assert verify(root, key, "--current-only").startswith("ok: ")
    assert snapshot(root) == content
    assert not list((root / "data" / "txn").iterdir())
    assert not (root / ".userpub" / "recompress").exists()


def test_publishes_removals_and_gc_between_the_two_phases(tmp_path, monkeypatch):
    """Phase 1 runs without the writer lock: what the publisher does meanwhile is kept."""
    from publisher.repositories.cvmfs_native import migrate

    config, root, key = old_site(tmp_path)
    repo = native(config, root)
    repo.recover()
    phase_one = migrate.canonical_objects

    def meanwhile(*args, **kwargs):
        done = phase_one(*args, **kwargs)
        with repo.transaction() as txn:
            txn.add("during", make_tarball(tmp_path / "d.tgz", {"f": b"during\n"}), "me",
                    UnpackLimits())
            txn.remove(["grp/b"])
        repo.gc()  # keep_hours 0: grp/b's objects, some re-compressed by phase 1, go
        return done

    monkeypatch.setattr(migrate, "canonical_objects", meanwhile)
    result = migrate.recompress(repo, processes=0)
    assert result.revision == OLD_REVISION + 3 and result.rewritten > 0
    assert sorted(repo.cids()) == ["during", "grp/a", "late"]
    assert verify(root, key, "--current-only").startswith("ok: ")
    assert check_repository(root).files[b"/sw/during/f"] == b"during\n"
