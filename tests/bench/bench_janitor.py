"""Janitor benchmark: clean a repository of 10,000 CIDs of which half expire.

Builds two local repositories in a fresh directory (the layout the local backend publishes:
``sw/<group>/<cid>/`` with a publisher record, a catalog marker and a small source tree per
CID; stamps in ``ts/``, some of them in the other repository), then times one real cleanup
(:func:`janitor.cleanup.clean`: transaction lock, scan, per-CID re-check and removal in one
transaction, gc, flush) and prints seconds and CIDs/s, split into scan, removal and gc.

It also times creating a small tree (as a publish would) just before and just after the cleanup:
on ext4 without a journal, freshly freed inodes slow file creation down for a while.

    python -m tests.bench.bench_janitor [--cids 10000] [--dir .bench] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from janitor.cleanup import clean
from tests.helpers import REPO_ROOT, write_config
from userpub.config import Config, load_config
from userpub.fsutil import remove_tree, syncfs

DAY = 86400.0
REPO1, REPO2 = "repo1.example.org", "repo2.example.org"
TREE = {"bin/run.sh": 120, "lib/pkg/a.py": 2_000, "lib/pkg/b.py": 4_000, "src/main.c": 8_000,
        "README": 200, ".cvmfscatalog": 0, ".publisher": 40}


def _write_cid(top: Path, when: float) -> None:
    for rel, size in TREE.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * size)
        os.close(fd)
    os.utime(top / ".publisher", (when, when))


def _stamp(root: Path, cid: str, when: float) -> None:
    path = root / "ts" / cid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("bench\n")
    os.utime(path, (when, when))


def build(directory: Path, cids: int, seed: int = 1) -> tuple[Config, int]:
    """A site whose first repository holds ``cids`` CIDs; return it and how many expire."""
    rng = random.Random(seed)
    config = load_config(write_config(directory, 2))
    roots = [r.root for r in config.repositories]
    assert all(root is not None for root in roots)
    root1, root2 = (Path(str(r)) for r in roots)
    for root in (root1, root2):
        for sub in ("sw", "ts", ".userpub/staging", ".userpub/trash"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    now = time.time()
    expiring = 0
    for i in range(cids):
        cid = f"grp{i % 50:02d}/{rng.getrandbits(256):064x}"
        old = i % 2 == 0
        published = now - rng.uniform(31, 90) * DAY  # the kept half is kept by recent use
        _write_cid(root1 / "sw" / cid, published)
        if old:
            expiring += 1
            if i % 6 == 0:  # an old stamp does not save it
                _stamp(root1, cid, now - rng.uniform(31, 60) * DAY)
        else:
            kind = i % 6  # kept by a recent publish or a recent stamp here or in the other repo
            if kind == 1:
                os.utime(root1 / "sw" / cid / ".publisher", (now - DAY, now - DAY))
            elif kind == 3:
                _stamp(root1, cid, now - rng.uniform(0, 29) * DAY)
            else:
                _stamp(root2, cid, now - rng.uniform(0, 29) * DAY)
    for _ in range(200):  # orphan stamps
        _stamp(root1, f"gone/{rng.getrandbits(256):064x}", now - rng.uniform(1, 60) * DAY)
    return config, expiring


def time_small_tree(directory: Path, files: int = 2000) -> float:
    """Seconds to create ``files`` small files in a new directory (a publish's unpack)."""
    top = Path(tempfile.mkdtemp(dir=directory))
    start = time.monotonic()
    for i in range(files):
        d = top / f"d{i // 100}"
        if i % 100 == 0:
            d.mkdir()
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"y" * 512)
        os.close(fd)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    """Build, clean, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cids", type=int, default=10_000)
    parser.add_argument("--dir", default=str(REPO_ROOT / ".bench"))
    parser.add_argument("--keep", action="store_true", help="keep the site afterwards")
    args = parser.parse_args(argv)
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="janitor-", dir=base))
    t0 = time.monotonic()
    config, expiring = build(site / "site", args.cids)
    syncfs(site)
    print(f"built {args.cids} CIDs ({expiring} expiring, 200 orphan stamps) in "
          f"{time.monotonic() - t0:.1f} s under {site}", flush=True)
    before = time_small_tree(site)

    marks: dict[str, float] = {}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        marks.setdefault("first", now)
        marks["last"] = now

    start = time.monotonic()
    result = clean(config, REPO1, progress=progress)
    total = time.monotonic() - start
    after = time_small_tree(site)
    scan = marks["first"] - start
    remove = marks["last"] - marks["first"]
    rest = total - scan - remove
    print(f"cleaned a repository of {args.cids} CIDs, removed {result.cids} CIDs and "
          f"{result.stamps} stamps ({result.bytes_freed / 1e6:.1f} MB) in {total:.2f} s = "
          f"{args.cids / total:,.0f} CIDs/s scanned, {result.cids / total:,.0f} CIDs/s removed")
    print(f"  scan+judge {scan:.2f} s, re-check+remove (renames) {remove:.2f} s, "
          f"gc+flush+spool housekeeping {rest:.2f} s")
    print(f"  2000-file tree created just before the cleanup {before:.2f} s, just after "
          f"{after:.2f} s ({after / before:.1f}x: ext4 recently-deleted inodes)")
    assert result.cids == expiring, (result.cids, expiring)
    if not args.keep:
        remove_tree(site)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
