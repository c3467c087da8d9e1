"""Replication benchmark: how long after a publish on A its revision is served by B's replica.

Site A's cvmfs-native repository is served by the ingest's stratum-0 application (cheroot on
loopback); site B runs the real ``userpub replicator`` process. Each of ``--publishes`` small
publications on A, made at a random moment of B's pull cycle, is timed from the moment its
manifest is switched until B's replica serves that revision (B's manifest file, polled every
5 ms): the replication lag, p50 and p95. It waits for the next pull (at most
``replica_interval``) and then the pull itself: goal p95 <= interval + 0.25 s. The baseline
measured in the same run is one incremental pull of one new revision by our engine and by the
genuine ``cvmfs_swissknife pull`` (when the tools are present), alternating; and the first pull
of the whole repository (2000 small files and a chunked 24 MB file among the CIDs) by each.

    python -m tests.bench.bench_replication [--publishes 20] [--interval 1] [--dir .bench]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from publisher.repositories.cvmfs_native import NativeRepository, init_keys
from publisher.repositories.cvmfs_native.replica import Origin, ReplicaPuller
from publisher.repositories.cvmfs_native.replica_objects import read_local_manifest
from publisher.tarball import UnpackLimits
from tests.cvmfs_genuine import TOOLS
from tests.helpers import Daemon, make_tarball, write_config
from tests.unit.test_cvmfs_native_stratum0 import serve_stratum0
from userpub.fsutil import remove_tree

REPO = "repo1.example.org"


def _publish(repo: NativeRepository, work: Path, cid: str) -> float:
    """Publish one small CID; return the time its manifest was switched."""
    tarball = make_tarball(work / "t.tgz", {"bin/tool": f"#!/bin/sh\necho {cid}\n".encode(),
                                            "lib/data": os.urandom(20_000)})
    with repo.transaction() as txn:
        txn.add(cid, tarball, "bench", UnpackLimits())
    return time.monotonic()


def _served(replica: Path) -> int:
    local = read_local_manifest(replica)
    return -1 if local is None else local[1].revision


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _genuine_pull(url: str, s1: Path, s1_url: str, key: Path, scratch: Path,
                  initial: bool) -> float | None:
    tool = TOOLS / "bin" / "cvmfs_swissknife"
    if not os.access(tool, os.X_OK):
        return None
    if initial:
        (s1 / "data" / "txn").mkdir(parents=True)
        for i in range(256):
            (s1 / "data" / f"{i:02x}").mkdir(exist_ok=True)
        scratch.mkdir(parents=True)
    argv = [str(tool), "pull", "-m", REPO, "-u", url, "-w", s1_url,
            "-r", f"local,{s1}/data/txn,{s1}", "-x", str(scratch), "-k", str(key), "-n", "4",
            "-t", "60", "-a", "3", "-R", str(scratch / "reflog.chksum")]
    argv += ["-i"] if initial else ["-p"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(TOOLS / "lib"))
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"genuine pull failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--baseline-runs", type=int, default=5)
    parser.add_argument("--dir", default=".bench")
    args = parser.parse_args(argv)
    work = Path(args.dir).resolve() / f"replication-{os.getpid()}"
    keys = init_keys(work / "a" / "keys", REPO)
    repo = NativeRepository(REPO, work / "a" / REPO, "sw", "ts", f"/cvmfs/{REPO}", keys=keys,
                            durable=True)
    repo.recover()
    _publish(repo, work, "warm/0")
    bulk = {f"src/{i // 100}/f{i}.c": os.urandom(1000 + i % 9000) for i in range(2000)}
    bulk["lib/big.so"] = os.urandom(24 << 20)
    with repo.transaction() as txn:
        txn.add("bulk/0", make_tarball(work / "bulk.tgz", bulk), "bench", UnpackLimits())
    print(f"# {os.cpu_count()} cores; command: python -m tests.bench.bench_replication "
          f"--publishes {args.publishes} --interval {args.interval:g}")
    replicator = None
    try:
        with serve_stratum0({REPO: repo.root}) as base:
            url = f"{base}/cvmfs/{REPO}"
            path = write_config(work / "b", repos=1, server="pub2", hosts={0: "pub1"},
                                backend="cvmfs-native",
                                repo_extra=(f'replica = "replica/{REPO}"\norigin = "{url}"\n'
                                            f'master_key = "{keys.master_public}"\n'))
            text = path.read_text().replace("durable = false", "durable = true")
            path.write_text(text.replace('state = "state"',
                                         f'state = "state"\nreplica_interval = {args.interval}'))
            replica = work / "b" / "replica" / REPO
            replicator = Daemon(path, "replicator", log=work / "replicator.log")
            while _served(replica) != repo.manifest().revision:
                time.sleep(0.01)
            lags = []
            rng = random.Random(15)
            for i in range(args.publishes):
                time.sleep(rng.uniform(0, args.interval))  # a random phase of B's cycle
                switched = _publish(repo, work, f"lag/{i}")
                wanted = repo.manifest().revision
                while _served(replica) < wanted:
                    time.sleep(0.005)
                lags.append(time.monotonic() - switched)
            replicator.stop()
            replicator = None
            ours, theirs = [], []
            engine = ReplicaPuller(Origin(url, REPO, keys.master_public), work / "ours" / REPO,
                                   work / "ours.json", durable=True)
            initial = engine.pull()
            s1 = work / "genuine" / REPO
            with serve_stratum0({REPO: s1}) as s1_base:
                first = _genuine_pull(url, s1, f"{s1_base}/cvmfs/{REPO}", keys.master_public,
                                      work / "genuine-tmp", initial=True)
                for i in range(args.baseline_runs):
                    _publish(repo, work, f"baseline/{i}")
                    ours.append(engine.pull().seconds)
                    if first is not None:
                        genuine = _genuine_pull(url, s1, f"{s1_base}/cvmfs/{REPO}",
                                                keys.master_public, work / "genuine-tmp",
                                                initial=False)
                        assert genuine is not None
                        theirs.append(genuine)
        p50, p95 = statistics.median(lags), _percentile(lags, 0.95)
        print(f"replication lag (publish on A -> served by B's replica), {len(lags)} publishes, "
              f"replica_interval {args.interval:g} s: p50 {p50:.3f} s, p95 {p95:.3f} s, "
              f"max {max(lags):.3f} s; p95 - interval = {p95 - args.interval:.3f} s "
              f"(goal <= 0.25 s) {'OK' if p95 - args.interval <= 0.25 else 'MISSED'}")
        line = (f"first pull of the whole repository ({initial.objects} objects, "
                f"{initial.bytes / 1e6:.1f} MB): userpub {initial.seconds:.2f} s")
        if first is not None:
            line += f", genuine cvmfs_swissknife pull {first:.2f} s; ratio " \
                    f"{initial.seconds / first:.2f}"
        print(line)
        line = (f"one incremental pull of one revision: userpub median "
                f"{statistics.median(ours) * 1000:.1f} ms")
        if theirs:
            line += (f", genuine cvmfs_swissknife pull median {statistics.median(theirs) * 1000:.1f}"
                     f" ms; ratio {statistics.median(ours) / statistics.median(theirs):.2f}")
        else:
            line += f" (the genuine tools are not at {TOOLS}: no comparison)"
        print(line)
    finally:
        if replicator is not None:
            replicator.stop()
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
