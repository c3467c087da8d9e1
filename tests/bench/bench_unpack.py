"""Benchmark ``publisher.tarball.unpack.unpack`` against GNU tar on the mixed corpus.

    python -m tests.bench.bench_unpack [--scale S] [--runs N] [--cache DIR] [--formats gzip,bzip2]

For each format: one warm-up of each contender, then N back-to-back pairs (the order alternates
between pairs), each extraction into a fresh directory on the same disk as the cache. Nothing is
deleted during a timed set: on this ext4 without a journal, unpacking right after a mass delete
is 10-30x slower (limits.md, quirk 2). The trees are removed at the end, followed by a sync and
a 65 s pause so that benchmarks run right after this one are not slowed down by the deletion
(--no-settle skips the pause, --keep keeps the trees).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from publisher.tarball.unpack import unpack
from tests.bench.corpus import make_corpus, make_tarballs

_TAR_FLAG = {"gzip": "-xzf", "bzip2": "-xjf", "xz": "-xJf", "none": "-xf"}
GOALS = {"gzip": 1.0, "bzip2": 0.9}


def _time_tar(tarball: Path, flag: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["tar", flag, str(tarball), "-C", str(out)], check=True)
    return time.perf_counter() - t0


def _time_unpack(tarball: Path, out: Path) -> float:
    t0 = time.perf_counter()
    unpack(tarball, out)
    return time.perf_counter() - t0


def bench(tarball: Path, fmt: str, runs: int, work: Path) -> tuple[list[float], list[float]]:
    """Return (tar times, unpack times) for *runs* alternating pairs after one warm-up each."""
    flag = _TAR_FLAG[fmt]
    tars: list[float] = []
    ours: list[float] = []
    _time_tar(tarball, flag, Path(tempfile.mkdtemp(dir=work)))
    _time_unpack(tarball, Path(tempfile.mkdtemp(dir=work)) / "x")
    for i in range(runs):
        order = ("tar", "unpack") if i % 2 == 0 else ("unpack", "tar")
        for who in order:
            d = Path(tempfile.mkdtemp(dir=work))
            if who == "tar":
                tars.append(_time_tar(tarball, flag, d))
            else:
                ours.append(_time_unpack(tarball, d / "x"))
            print(f"  {fmt:6s} {who:6s} {(tars if who == 'tar' else ours)[-1]:7.2f} s", flush=True)
    return tars, ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(".bench"))
    ap.add_argument("--formats", default="gzip,bzip2")
    ap.add_argument("--keep", action="store_true", help="do not delete the extracted trees")
    ap.add_argument("--no-settle", action="store_true", help="no pause after deleting them")
    args = ap.parse_args(argv)
    corpus = make_corpus(args.cache, args.scale)
    tarballs = make_tarballs(corpus, args.cache / "tarballs")
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.cache))
    results = []
    try:
        for fmt in args.formats.split(","):
            tb = tarballs[fmt]
            print(f"{fmt}: {tb} ({tb.stat().st_size / 1e6:.0f} MB)", flush=True)
            tars, ours = bench(tb, fmt, args.runs, work)
            results.append((fmt, tars, ours))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            os.sync()
            if not args.no_settle:
                print("deleted the trees; waiting 65 s for ext4 to settle", flush=True)
                time.sleep(65)
    print(
        f"\n{'format':8s} {'tar s':>8s} {'unpack s':>9s} {'ratio':>6s} {'goal':>5s}  (min: tar unpack)"
    )
    ok = True
    for fmt, tars, ours in results:
        t, u = statistics.median(tars), statistics.median(ours)
        goal = GOALS.get(fmt, 1.0)
        ok = ok and u / t <= goal
        print(
            f"{fmt:8s} {t:8.2f} {u:9.2f} {u / t:6.2f} {goal:5.1f}  {min(tars):.2f} {min(ours):.2f}"
        )
    print(
        f"(medians of {args.runs} runs; trees {'kept in ' + str(work) if args.keep else 'deleted'})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
