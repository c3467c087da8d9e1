"""Load benchmark: concurrent uploads of mixed sizes with a steady stream of ``exists`` requests.

A real ``userpub ingest`` process (TLS, client proxies, its production defaults of 32 threads)
receives ``--uploads`` concurrent uploads (python-requests, as jobsub_lite sends them: a
Content-Length body from a file) of mixed sizes, while ``--exists-threads`` clients send
``exists`` requests at ``--exists-rate`` per second in all (keep-alive sessions), for CIDs
published beforehand (``PRESENT:``) and unknown ones (``MISSING``). Every answer is checked.

Printed: upload throughput (MB/s over the wall time of the whole set) and the p50/p95/p99
latency of an upload and of an ``exists`` request, the achieved ``exists`` rate, and the
server's peak RSS (VmHWM).

    python -m tests.bench.bench_load [--uploads 50] [--scale 1.0] [--exists-rate 50]
                                      [--exists-threads 4] [--dir .bench]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from spool import Spool
from tests.helpers import make_tarball
from tests.integration.test_hostile_support import IngestDaemon
from tests.pki import TestPKI, ingest_config
from userpub.config import Config

MIB = 1 << 20
# (count, bytes of content) per class for 50 uploads at scale 1: 256 MiB in all
MIX = ((20, 64 << 10), (15, MIB), (10, 8 * MIB), (5, 32 * MIB))


@dataclass
class LoadResult:
    """What one load run measured and found."""

    wall: float = 0.0
    upload_bytes: int = 0
    upload_latency: list[float] = field(default_factory=list)
    exists_latency: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_rss_kib: int = 0
    uploaded: dict[str, str] = field(default_factory=dict)  # cid -> sha256 of the body


def mixed_sizes(uploads: int, scale: float) -> list[int]:
    """Content sizes of ``uploads`` tarballs, the classes of MIX in proportion."""
    total = sum(n for n, _ in MIX)
    sizes = [max(1024, int(size * scale)) for n, size in MIX for _ in range(n)]
    picked = [sizes[i * total // uploads] for i in range(uploads)]
    random.Random(uploads).shuffle(picked)
    return picked


def make_tarballs(directory: Path, sizes: list[int]) -> dict[str, Path]:
    """One tarball per size (incompressible content, uncompressed tar); CID -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    block = os.urandom(MIB)
    for i, size in enumerate(sizes):
        data = (block * (size // MIB + 1))[:size - 16] + os.urandom(16)
        path = make_tarball(directory / f"t{i:03d}.tar", {f"load/f{i}.bin": data}, mode="w")
        out[f"load/{hashlib.sha256(path.read_bytes()).hexdigest()}"] = path
    return out


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process in KiB (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_load(base: str, pki: TestPKI, pid: int, tarballs: dict[str, Path],
             present: dict[str, str], *, exists_threads: int, exists_rate: float,
             missing: int = 100) -> LoadResult:
    """Upload ``tarballs`` all at once to ``base`` while ``exists_threads`` clients ask
    ``exists`` at ``exists_rate`` per second in all, for the CIDs of ``present`` (CID ->
    expected answer) and ``missing`` unknown ones. Every answer is checked."""
    result = LoadResult()
    cert, verify = pki.cert("proxy"), str(pki.ca_file)
    lock = threading.Lock()
    done = threading.Event()
    questions = [(cid, answer) for cid, answer in present.items()]
    questions += [(f"load/missing{i}", "MISSING\n") for i in range(missing)]

    def fail(message: str) -> None:
        with lock:
            result.errors.append(message)

    def upload(cid: str, path: Path) -> None:
        started = time.monotonic()
        try:
            with path.open("rb") as fh:
                r = requests.post(f"{base}/pubapi/publish", params={"cid": cid}, data=fh,
                                  cert=cert, verify=verify, timeout=600)
        except requests.RequestException as err:
            fail(f"upload {cid}: {err!r}")
            return
        elapsed = time.monotonic() - started
        if (r.status_code, r.text) != (200, "OK\n"):
            fail(f"upload {cid}: {r.status_code} {r.text!r}")
            return
        with lock:
            result.upload_latency.append(elapsed)
            result.upload_bytes += path.stat().st_size
            result.uploaded[cid] = hashlib.sha256(path.read_bytes()).hexdigest()

    def asker(n: int) -> None:
        rng = random.Random(n)
        period = exists_threads / exists_rate
        next_at = time.monotonic()
        # keep-alive; cert and verify per request (REQUESTS_CA_BUNDLE beats session.verify)
        with requests.Session() as session:
            while not done.is_set():
                cid, want = rng.choice(questions)
                started = time.monotonic()
                try:
                    r = session.get(f"{base}/pubapi/exists", params={"cid": cid}, cert=cert,
                                    verify=verify, timeout=60)
                except requests.RequestException as err:
                    fail(f"exists {cid}: {err!r}")
                    continue
                elapsed = time.monotonic() - started
                if (r.status_code, r.text) != (200, want):
                    fail(f"exists {cid}: {r.status_code} {r.text!r}, wanted {want!r}")
                with lock:
                    result.exists_latency.append(elapsed)
                next_at += period
                done.wait(max(0.0, next_at - time.monotonic()))

    askers = [threading.Thread(target=asker, args=(n,), daemon=True)
              for n in range(exists_threads)]
    for t in askers:
        t.start()
    time.sleep(0.5)  # the stream is steady before the uploads begin
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(tarballs)) as pool:
        for future in [pool.submit(upload, cid, path) for cid, path in tarballs.items()]:
            future.result()
    result.wall = time.monotonic() - started
    done.set()
    for t in askers:
        t.join(60)
    result.peak_rss_kib = peak_rss_kib(pid)
    return result


def check_queued(config: Config, result: LoadResult) -> list[str]:
    """Problems with the queued entries: each upload answered OK is in incoming/, whole."""
    spool = Spool(config.server.spool)
    problems = []
    for cid, digest in result.uploaded.items():
        try:
            entry = spool.read_entry(spool.incoming / cid.replace("/", "%2F"))
        except (OSError, ValueError) as err:
            problems.append(f"{cid}: not queued ({err})")
            continue
        h = hashlib.sha256()
        with entry.payload.open("rb") as fh:
            while chunk := fh.read(MIB):
                h.update(chunk)
        if h.hexdigest() != digest:
            problems.append(f"{cid}: queued payload differs from the upload")
    return problems


def percentiles(xs: list[float]) -> str:
    """p50/p95/p99 in milliseconds."""
    if len(xs) < 2:
        return "n/a"
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return f"p50 {q[49] * 1000:8.1f} ms  p95 {q[94] * 1000:8.1f} ms  p99 {q[98] * 1000:8.1f} ms"


def report(result: LoadResult, out: Callable[[str], None] = print) -> None:
    """Print the figures of a run."""
    mb = result.upload_bytes / 1e6
    out(f"uploads: {len(result.upload_latency)} answered OK, {mb:.1f} MB in {result.wall:.2f} s "
        f"= {mb / result.wall if result.wall else 0:.1f} MB/s, "
        f"{len(result.upload_latency) / result.wall if result.wall else 0:.1f} uploads/s")
    out(f"  upload latency  {percentiles(result.upload_latency)}")
    rate = len(result.exists_latency) / result.wall if result.wall else 0
    out(f"exists: {len(result.exists_latency)} answered ({rate:.1f}/s during the uploads)")
    out(f"  exists latency  {percentiles(result.exists_latency)}")
    out(f"server peak RSS: {result.peak_rss_kib / 1024:.1f} MiB")
    out(f"errors: {len(result.errors)}" + "".join(f"\n  {e}" for e in result.errors[:20]))


class LoadSite:
    """A site with a real ``userpub ingest`` (and CIDs already published for ``exists``)."""

    def __init__(self, work: Path, *, threads: int = 32, published: int = 20) -> None:
        self.work = work
        self.pki = TestPKI(work / "pki")
        self.config = ingest_config(work / "site", self.pki, http=False, threads=threads,
                                    socket_timeout=60.0)
        self.present: dict[str, str] = {}
        for i, repo in enumerate(self.config.repositories):
            assert repo.root is not None
            for j in range(published // len(self.config.repositories)):
                cid = f"done/c{i}-{j}"
                (repo.root / "sw" / cid).mkdir(parents=True)
                (repo.root / "sw" / cid / ".publisher").write_text("bench\n")
                self.present[cid] = f"PRESENT:/cvmfs/{repo.name}/sw/{cid}\n"
        self.ingest = IngestDaemon(self.config.path, work / "ingest.log")
        self.base = f"https://{self.ingest.https}"

    def stop(self) -> int:
        return self.ingest.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies upload sizes")
    parser.add_argument("--exists-rate", type=float, default=50.0, help="requests/s in all")
    parser.add_argument("--exists-threads", type=int, default=4)
    parser.add_argument("--dir", default=".bench")
    args = parser.parse_args(argv)
    base_dir = Path(args.dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    sizes = mixed_sizes(args.uploads, args.scale)
    if shutil.disk_usage(base_dir).free < 3 * sum(sizes) + (1 << 30):
        print(f"skipped: needs {3 * sum(sizes) >> 20} MiB free in {base_dir}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="load-", dir=base_dir))
    try:
        tarballs = make_tarballs(work / "tarballs", sizes)
        site = LoadSite(work)
        try:
            print(f"{args.uploads} concurrent uploads ({sum(sizes) / 1e6:.0f} MB of content, "
                  f"{len(tarballs)} tarballs from {min(sizes) >> 10} KiB to "
                  f"{max(sizes) >> 20} MiB) and exists at {args.exists_rate:.0f}/s from "
                  f"{args.exists_threads} clients; server: 32 threads, TLS", flush=True)
            result = run_load(site.base, site.pki, site.ingest.proc.pid, tarballs, site.present,
                              exists_threads=args.exists_threads,
                              exists_rate=args.exists_rate)
        finally:
            site.stop()
        result.errors += check_queued(site.config, result)
        report(result)
        return 1 if result.errors else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
