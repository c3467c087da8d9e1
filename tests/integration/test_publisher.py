"""Real publisher processes over a real spool and real local repositories."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from spool import Spool
from spool.names import encode_name
from tests.helpers import Daemon, make_tarball, run_userpub, tree_listing, wait_for, write_config
from userpub.config import load_config

REPO1, REPO2 = "repo1.example.org", "repo2.example.org"


@pytest.fixture
def site(tmp_path):
    path = write_config(tmp_path / "site")
    return path, load_config(path)


def cid_dir(config, repo_index, cid):
    return config.repositories[repo_index].root / "sw" / cid


def start_publisher(config_path, repo, tmp_path, name=None):
    return Daemon(config_path, "publisher", "--repo", repo,
                  log=tmp_path / f"{name or repo}.{time.monotonic_ns()}.log")


def test_drop_is_published_with_content_marker_and_record(site, tmp_path):
    path, config = site
    files = {"bin/run.sh": b"#!/bin/sh\necho hi\n", "lib/data.txt": b"x" * 10_000, "README": b"r"}
    tarball = make_tarball(tmp_path / "code.tar.gz", files)
    pub = start_publisher(path, REPO1, tmp_path)
    try:
        pub.wait_log("publisher ready")
        out = run_userpub(path, "drop", str(tarball), "--cid", "grp/abc123").stdout.strip()
        assert out == "grp/abc123"
        target = cid_dir(config, 0, "grp/abc123")
        wait_for(target.is_dir, 15, pub.log)
        listing = tree_listing(target)
        for name, data in files.items():
            assert listing[name] == data
        assert listing[".cvmfscatalog"] == b""
        assert b"userpub drop" in listing[".publisher"]
        assert oct(os.stat(target / "lib/data.txt").st_mode & 0o777) == "0o644"
        status = run_userpub(path, "status", "grp/abc123").stdout.strip()
        assert status == "PRESENT:/cvmfs/repo1.example.org/sw/grp/abc123"
        missing = run_userpub(path, "status", "grp/never-sent", check=False)
        assert (missing.stdout, missing.returncode) == ("MISSING\n", 3)  # the client's codes
        # the spool is empty again, nothing left in staging
        spool = Spool(config.server.spool)
        wait_for(lambda: spool.depth().incoming == 0 and not any(spool.iter_active(REPO1)))
        assert list((config.repositories[0].root / ".userpub/staging").iterdir()) == []
    finally:
        assert pub.stop() == 0


def test_drop_default_cid_is_sha256_and_operator_rename(site, tmp_path):
    path, config = site
    tarball = make_tarball(tmp_path / "a.tar.bz2", {"f": b"bzip2 content"}, mode="w:bz2")
    pub = start_publisher(path, REPO1, tmp_path)
    try:
        pub.wait_log("publisher ready")
        cid = run_userpub(path, "drop", str(tarball)).stdout.strip()
        assert len(cid) == 64
        wait_for(cid_dir(config, 0, cid).is_dir, 15, pub.log)
        # an operator's plain file, renamed in from the same filesystem
        other = make_tarball(tmp_path / "b.tar.xz", {"g": b"xz"}, mode="w:xz")
        staging = config.server.spool / "tmp" / "b.part"
        shutil.copy(other, staging)
        os.rename(staging, config.server.spool / "incoming" / (encode_name("ops/b1") + ".tar.xz"))
        wait_for(cid_dir(config, 0, "ops/b1").is_dir, 15, pub.log)
        assert (cid_dir(config, 0, "ops/b1") / "g").read_bytes() == b"xz"
    finally:
        pub.stop()


def test_already_published_cid_is_stamped_not_unpacked(site, tmp_path):
    path, config = site
    tarball = make_tarball(tmp_path / "a.tar.gz", {"f": b"1"})
    run_userpub(path, "drop", str(tarball), "--cid", "g/x")
    run_userpub(path, "publisher", "--repo", REPO1, "--once")
    record = cid_dir(config, 0, "g/x") / ".publisher"
    inode = record.stat().st_ino
    other = make_tarball(tmp_path / "b.tar.gz", {"f": b"2"})
    run_userpub(path, "drop", str(other), "--cid", "g/x")
    # publisher of the *other* repository sees it present in repo1 and stamps it there
    result = run_userpub(path, "publisher", "--repo", REPO2, "--once")
    assert "already published; stamped instead" in result.stderr
    assert not cid_dir(config, 1, "g/x").exists()
    assert record.stat().st_ino == inode
    assert (cid_dir(config, 0, "g/x") / "f").read_bytes() == b"1"
    assert (config.repositories[1].root / "ts" / "g" / "x").is_file()


def test_two_publishers_200_drops_each_published_exactly_once(site, tmp_path):
    path, config = site
    spool = Spool(config.server.spool)
    spool.ensure_layout()
    pubs = [start_publisher(path, r, tmp_path) for r in (REPO1, REPO2)]
    try:
        for p in pubs:
            p.wait_log("publisher ready")
        cids = [f"g{i % 7}/{i:04d}" for i in range(200)]
        for i, cid in enumerate(cids):
            tarball = make_tarball(tmp_path / f"t{i}.tar.gz", {"id": cid.encode(), "n/x": b"y" * i})
            spool.drop_file(tarball, cid, "tester")
        def all_done():
            return sum((cid_dir(config, 0, c).is_dir() or cid_dir(config, 1, c).is_dir())
                       for c in cids) == len(cids)
        wait_for(all_done, 120, lambda: pubs[0].log()[-3000:] + pubs[1].log()[-3000:])
        for cid in cids:
            places = [i for i in (0, 1) if cid_dir(config, i, cid).is_dir()]
            assert len(places) == 1, (cid, places)
            assert (cid_dir(config, places[0], cid) / "id").read_bytes() == cid.encode()
        # "published" is logged once the backend's publish returns, a moment after visibility
        wait_for(lambda: (pubs[0].log() + pubs[1].log()).count(": published ") == 200, 30)
        counts = [p.log().count(": published ") for p in pubs]
        assert all(c > 0 for c in counts), counts  # both did work
        assert spool.depth().failed == 0
    finally:
        for p in pubs:
            p.stop()


def test_second_publisher_waits_then_takes_over(site, tmp_path):
    path, config = site
    first = start_publisher(path, REPO1, tmp_path, "first")
    first.wait_log("publisher ready")
    second = start_publisher(path, REPO1, tmp_path, "second")
    try:
        second.wait_log("another publisher holds")
        tarball = make_tarball(tmp_path / "a.tar.gz", {"f": b"1"})
        run_userpub(path, "drop", str(tarball), "--cid", "a1")
        wait_for(cid_dir(config, 0, "a1").is_dir, 15)
        first.wait_log("published a1")
        assert "published a1" not in second.log()
        first.kill()
        second.wait_log("publisher ready", timeout=15)
        run_userpub(path, "drop", str(make_tarball(tmp_path / "b.tar.gz", {"f": b"2"})),
                    "--cid", "a2")
        wait_for(cid_dir(config, 0, "a2").is_dir, 15, second.log)
    finally:
        first.kill()
        second.stop()


def big_tarball(path: Path, files: int, size: int) -> dict[str, int]:
    rng = random.Random(7)
    contents = {f"d{i % 50}/f{i:05d}": rng.randbytes(size) for i in range(files)}
    make_tarball(path, contents, mode="w")  # plain tar: slow enough to unpack, fast to build
    return {k: len(v) for k, v in contents.items()}


def test_kill_9_mid_unpack_then_restart_publishes_completely(site, tmp_path):
    path, config = site
    expected = big_tarball(tmp_path / "big.tar", files=4000, size=20_000)
    run_userpub(path, "drop", str(tmp_path / "big.tar"), "--cid", "grp/big")
    target = cid_dir(config, 0, "grp/big")
    staging = config.repositories[0].root / ".userpub" / "staging"
    partial_views: list[int] = []
    stop = threading.Event()

    def reader():  # a concurrent reader must never see a partial tree
        while not stop.is_set():
            if target.is_dir():
                n = sum(len(f) for _, _, f in os.walk(target))
                if n != len(expected) + 2:
                    partial_views.append(n)
            time.sleep(0.001)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        pub = start_publisher(path, REPO1, tmp_path, "victim")
        wait_for(lambda: any(staging.glob("*/0/d*/*")), 30, pub.log)
        pub.kill()
        assert not target.exists()
        # the claimed entry is still in active/, the partial tree in staging
        assert any(Spool(config.server.spool).iter_active(REPO1))
        again = start_publisher(path, REPO1, tmp_path, "again")
        wait_for(target.is_dir, 60, again.log)
        assert "returned 1 claimed entries" in again.log()
        again.stop()
    finally:
        stop.set()
        watcher.join()
    assert partial_views == []
    listing = tree_listing(target)
    assert {k: len(v) for k, v in listing.items() if not isinstance(v, str)} == \
        {**expected, ".cvmfscatalog": 0, ".publisher": len(listing[".publisher"])}
    # the crash leftovers were moved out of sight (trash is emptied by gc)
    assert list(staging.iterdir()) == []


def test_sigterm_finishes_the_current_batch(site, tmp_path):
    path, config = site
    big_tarball(tmp_path / "big.tar", files=3000, size=10_000)
    pub = start_publisher(path, REPO1, tmp_path)
    pub.wait_log("publisher ready")
    run_userpub(path, "drop", str(tmp_path / "big.tar"), "--cid", "big")
    staging = config.repositories[0].root / ".userpub" / "staging"
    wait_for(lambda: any(staging.glob("*/0/*")), 30, pub.log)
    assert pub.stop() == 0
    assert cid_dir(config, 0, "big").is_dir()
