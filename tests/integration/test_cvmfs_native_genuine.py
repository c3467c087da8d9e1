"""The genuine CernVM-FS tools accept what the publisher writes: ``verify.sh`` exits 0.

A repository written by the real publisher process (chunked files, hard links, symlinks, a
nested catalog, an empty file and directory), then after a removal, a garbage collection and a
``kill -9`` in the middle of a publish followed by recovery: every step of ``verify.sh`` passes
(check of every tag, scrub, stratum-1 pull, scrub and check of the replica over HTTP, mounts
direct and through the replica with the files compared with their tarballs, ``cvmfs_fsck`` of
both client caches). Skipped when the tools are absent (see ``tests/cvmfs_genuine.py``).
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from publisher.repositories import open_reader, open_repository
from tests.cvmfs_genuine import assert_genuine_clean, genuine_tools, run_verify_sh
from tests.helpers import Daemon, run_userpub, wait_for, write_config
from tests.integration.test_cvmfs_native_crash import children, workload
from tests.unit.test_cvmfs_native_stratum0 import userpub
from userpub.config import load_config

REPO = "repo1.example.org"
MTIME = 1_700_000_000
Member = tuple[str, str, bytes | str | None]  # (name, f/x/d/l/h, content or link target)


def tarball(path: Path, members: list[Member]) -> Path:
    """A .tar.gz of regular files (f, x: executable), directories, symlinks and hard links."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = MTIME, 0o755 if kind in "xd" else 0o644
            if kind in "fx":
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "d":
                info.type = tarfile.DIRTYPE
            else:
                assert isinstance(data, str)
                info.type, info.linkname = (tarfile.SYMTYPE if kind == "l" else tarfile.LNKTYPE,
                                            data)
            tar.addfile(info)
    return path


def varied(tmp: Path) -> dict[str, Path]:
    """Tarballs by CID: every kind of entry, a chunked file, shared content, one to remove."""
    rng = random.Random(20)
    text = b"".join(b"%d: some source line of a user's code\n" % i for i in range(200_000))
    chunked = rng.randbytes(6 << 20) + text + bytes(3 << 20)  # ~16 MB: several P chunks
    return {
        "grp/a": tarball(tmp / "a.tar.gz", [
            ("bin/", "d", None), ("bin/run.sh", "x", b"#!/bin/sh\necho hi\n"),
            ("bin/again", "h", "bin/run.sh"), ("bin/more", "h", "bin/run.sh"),
            ("data/chunked.bin", "f", chunked), ("data/same.bin", "h", "data/chunked.bin"),
            ("rel", "l", "bin/run.sh"), ("updir", "l", "data"), ("lib/libx.so", "f",
                                                               rng.randbytes(300_000)),
            ("sub/.cvmfscatalog", "f", b""), ("sub/deep/notes.txt", "f", text[:70_000]),
            ("empty", "f", b""), ("emptydir/", "d", None)]),
        "grp/b": tarball(tmp / "b.tar.gz", [("copy.txt", "f", text[:70_000]),
                                            ("own.txt", "f", b"b\n")]),
        "solo": tarball(tmp / "solo.tar.gz", [("gone.txt", "f", b"to be removed\n" * 500)]),
    }


@pytest.mark.slow
def test_genuine_tools_accept_publishes_removals_gc_and_crash_recovery(tmp_path):
    genuine_tools()
    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native",
                        repo_extra="gc_keep_hours = 0", rescan=0.2)
    run_userpub(path, "keys", "init", REPO)
    config = load_config(path)
    root = config.repositories[0].root
    assert root is not None
    key = config.server.state / "keys" / f"{REPO}.pub"
    tarballs = varied(tmp_path)
    reader = open_reader(config, config.repositories[0])
    pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / "publisher.log")
    try:
        pub.wait_log("publisher ready", 60)
        for cid, tb in tarballs.items():
            run_userpub(path, "drop", str(tb), "--cid", cid)
        wait_for(lambda: all(reader.contains(c) for c in tarballs), 180, pub.log)
    finally:
        assert pub.stop() == 0
    pairs = {f"/sw/{cid}": tb for cid, tb in tarballs.items()}
    assert_genuine_clean(run_verify_sh(root, REPO, key, tmp_path / "first", pairs))

    repo = open_repository(config, config.repositories[0])
    with repo.transaction() as txn:
        txn.remove(["solo"])
        txn.stamp(["grp/a"], "a worker node")
    repo.gc()
    pairs.pop("/sw/solo")
    crashed = pairs["/sw/grp/c"] = workload(tmp_path / "c.tar", 3)
    pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / "killed.log")
    pub.wait_log("publisher ready", 60)
    run_userpub(path, "drop", str(crashed), "--cid", "grp/c")
    wait_for(lambda: children(pub.proc.pid), 60, "no object workers started")  # mid-publish
    pub.kill()
    pub.stop()
    pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / "recovered.log")
    try:
        wait_for(lambda: reader.contains("grp/c"), 180, pub.log)
    finally:
        assert pub.stop() == 0
    assert sorted(reader.cids()) == ["grp/a", "grp/b", "grp/c"]
    assert_genuine_clean(run_verify_sh(root, REPO, key, tmp_path / "final", pairs))
    out = userpub("verify", str(root), "--key", str(key)).stdout.decode()
    assert out.startswith("ok: ") and "not stored as" not in out, out
