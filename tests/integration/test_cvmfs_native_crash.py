"""kill -9 at any point of a publish (or a garbage collection) leaves a repository that verifies."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from publisher.repositories import open_reader
from tests.helpers import REPO_ROOT, Daemon, make_tarball, run_userpub, wait_for, write_config
from tests.unit.test_cvmfs_native_invariants import (
    check_repository,
    manifest_fields,
    userpub_verify,
)
from userpub.config import load_config

REPO = "repo1.example.org"


def workload(path: Path, seed: int) -> Path:
    """Thousands of small files and one chunked file: a publish of a second or two."""
    rng = random.Random(seed)
    files = {f"d{i % 40}/f{i}.txt": rng.randbytes(rng.randint(10, 3000)) for i in range(1500)}
    files["big/blob.bin"] = rng.randbytes(10 << 20)
    return make_tarball(path, files, mode="w")


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def revision(root: Path) -> int:
    return int(manifest_fields(root)["S"])


def check(root: Path, key: Path) -> int:
    check_repository(root)
    userpub_verify(root, key, REPO)
    return revision(root)


@pytest.mark.slow
def test_kill_minus_nine_at_random_points_of_publishing(tmp_path):
    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native", rescan=0.2)
    run_userpub(path, "keys", "init", REPO)
    config = load_config(path)
    root = config.repositories[0].root
    assert root is not None
    key = config.server.state / "keys" / f"{REPO}.pub"
    rng = random.Random(int(os.environ.get("USERPUB_CRASH_SEED", "11")))
    tarballs = [workload(tmp_path / f"w{i}.tar", i) for i in range(3)]
    last = 0
    dropped: list[str] = []
    for i in range(14):
        pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / f"pub{i}.log")
        pub.wait_log("publisher ready", 60)
        if i:
            assert revision(root) >= last
        cid = f"g{i % 3}/c{i}"
        run_userpub(path, "drop", str(tarballs[i % 3]), "--cid", cid)
        dropped.append(cid)
        gens = root / ".userpub" / "gen"
        if i % 3 == 0:  # aim at the switch: kill as soon as a new generation appears
            before = set(os.listdir(gens))
            deadline = time.monotonic() + 60
            while set(os.listdir(gens)) <= before and time.monotonic() < deadline:
                pass
            time.sleep(rng.choice([0, 0, 0.0005, 0.002]))
        else:
            time.sleep(rng.uniform(0.0, 3.0))
        workers = children(pub.proc.pid)
        pub.kill()
        pub.stop()
        wait_for(lambda ws=workers: not any(Path(f"/proc/{w}").exists() for w in ws), 10,
                 "object workers outlived their publisher")
        last = check(root, key)
    pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / "final.log")
    try:
        pub.wait_log("publisher ready", 60)
        reader = open_reader(config, config.repositories[0])
        wait_for(lambda: all(reader.contains(c) for c in dropped), 180, pub.log)
    finally:
        assert pub.stop() == 0
    assert check(root, key) >= last  # equal when the last kill came after its publish
    leftovers = list((root / "data" / "txn").iterdir())
    assert leftovers == []


GC = """
import sys
from userpub.config import load_config
from publisher.repositories import open_repository
config = load_config(__import__("pathlib").Path(sys.argv[1]))
repo = open_repository(config, config.repositories[0])
while True:
    repo.gc()
"""


@pytest.mark.slow
def test_kill_minus_nine_during_garbage_collection(tmp_path):
    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native",
                        repo_extra="gc_keep_hours = 0")
    run_userpub(path, "keys", "init", REPO)
    config = load_config(path)
    root = config.repositories[0].root
    assert root is not None
    key = config.server.state / "keys" / f"{REPO}.pub"
    from publisher.repositories import open_repository
    from publisher.tarball import UnpackLimits

    repo = open_repository(config, config.repositories[0])
    repo.recover()
    for i in range(4):
        with repo.transaction() as txn:
            txn.add(f"c{i}", workload(tmp_path / f"{i}.tar", i), "me", UnpackLimits())
    with repo.transaction() as txn:
        txn.remove(["c0", "c1"])
    rng = random.Random(5)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", GC, str(path)], cwd=REPO_ROOT)
        time.sleep(rng.uniform(0.3, 2.0))
        proc.kill()
        proc.wait()
        check(root, key)
        assert sorted(open_reader(config, config.repositories[0]).cids()) == ["c2", "c3"]
    repo.recover()
    repo.gc()
    check(root, key)


@pytest.fixture(autouse=True)
def _quiet_python(monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
