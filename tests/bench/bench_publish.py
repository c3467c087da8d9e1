"""Publish benchmark: a real publisher process against GNU tar, measured in the same run.

Prints, for a generated ~500 MB gzip tarball (tens of thousands of small files plus a few large
ones) and its bzip2 twin: the median time from the rename into ``incoming/`` to the CID being
visible in the repository, divided by the median of ``tar -xzf`` / ``tar -xjf`` of the same
tarball (runs alternate back to back, each into a fresh directory, nothing deleted during a
set because of the ext4 recently-deleted penalty). Then the latency from a rename into
``incoming/`` to the CID becoming visible for small tarballs (an upper bound of the latency to
the start of unpacking).

    python -m tests.bench.bench_publish [--scale 1.0] [--runs 3] [--dir .bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from spool.names import encode_name
from tests.bench.corpus import make_corpus, make_tarballs
from tests.helpers import Daemon, make_tarball, wait_for, write_config
from userpub.config import load_config
from userpub.fsutil import remove_tree

REPO = "repo1.example.org"


def _publish_once(config_path: Path, incoming: Path, root: Path, tarball: Path, cid: str
                  ) -> float:
    staging = incoming.parent / "tmp" / f"{cid}.part"
    os.link(tarball, staging)  # same filesystem: the drop is a rename, as an operator's mv
    target = root / "sw" / cid
    start = time.monotonic()
    os.rename(staging, incoming / encode_name(cid))
    while not target.is_dir():
        time.sleep(0.0005)
    return time.monotonic() - start


def _tar(flag: str, tarball: Path, dest: Path) -> float:
    dest.mkdir(parents=True)
    start = time.monotonic()
    subprocess.run(["tar", flag, str(tarball), "-C", str(dest)], check=True)
    return time.monotonic() - start


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--dir", default=".bench")
    parser.add_argument("--durable", choices=("true", "false"), default="true")
    args = parser.parse_args(argv)
    base = Path(args.dir).resolve()
    corpus = make_corpus(base, args.scale)
    tarballs = make_tarballs(corpus, base / "tarballs")
    work = base / f"publish-{os.getpid()}"
    config_path = write_config(work / "site", repos=1, rescan=5.0)
    text = config_path.read_text().replace("durable = false", f"durable = {args.durable}")
    config_path.write_text(text)
    config = load_config(config_path)
    root = config.repositories[0].root
    assert root is not None
    pub = Daemon(config_path, "publisher", "--repo", REPO, log=work / "publisher.log")
    try:
        pub.wait_log("publisher ready")
        incoming = config.server.spool / "incoming"
        print(f"# corpus: {tarballs['gzip'].stat().st_size / 1e6:.0f} MB gzip, "
              f"{tarballs['bzip2'].stat().st_size / 1e6:.0f} MB bzip2, "
              f"{tarballs['none'].stat().st_size / 1e6:.0f} MB tar; durable={args.durable}")
        for kind, flag in (("gzip", "-xzf"), ("bzip2", "-xjf")):
            ours: list[float] = []
            theirs: list[float] = []
            # warm-up of both (page cache, first-touch memory), not counted
            _tar(flag, tarballs[kind], work / f"warm-tar-{kind}")
            _publish_once(config_path, incoming, root, tarballs[kind], f"warm-{kind}")
            for i in range(args.runs):
                theirs.append(_tar(flag, tarballs[kind], work / f"tar-{kind}-{i}"))
                ours.append(_publish_once(config_path, incoming, root, tarballs[kind],
                                          f"{kind}-{i}"))
            ratio = _median(ours) / _median(theirs)
            goal = 1.2 if kind == "gzip" else 1.0
            print(f"publish {kind}: userpub median {_median(ours):.2f} s "
                  f"(runs {', '.join(f'{x:.2f}' for x in ours)}), tar {flag} median "
                  f"{_median(theirs):.2f} s (runs {', '.join(f'{x:.2f}' for x in theirs)}); "
                  f"ratio {ratio:.2f} (goal <= {goal}) {'OK' if ratio <= goal else 'MISSED'}")
        small = make_tarball(work / "small.tar.gz", {"a/b.txt": b"hello\n" * 100})
        latencies = []
        for i in range(args.latency_runs):
            latencies.append(_publish_once(config_path, incoming, root, small, f"lat/{i:04d}"))
            time.sleep(0.05)
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p95 = latencies[int(len(latencies) * 0.95) - 1] * 1000
        print(f"latency rename->visible (small tarball, {len(latencies)} runs): p50 {p50:.1f} ms, "
              f"p95 {p95:.1f} ms, max {latencies[-1] * 1000:.1f} ms "
              f"(goal: rename->start of unpacking p50 <= 50 ms) {'OK' if p50 <= 50 else 'MISSED'}")
        wait_for(lambda: not any(incoming.iterdir()), 30)
    finally:
        pub.stop()
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
