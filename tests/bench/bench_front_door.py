"""Front-door benchmark: fresh requests and uploads while 1,000 idle and 100 slow-drip
connections are held open (issue 19).

A real ``userpub ingest`` (the example's 16 threads, every front-door limit at its default).
An attacker process keeps ``--idle`` TCP connections open that never send a byte and
``--drips`` TLS connections whose request heads grow by one byte every 0.1 s and never end,
spread over loopback source addresses (50 per address, below the per-client limit); whatever
the server closes (handshake and header timeouts) it reopens at once. Measured in the same run,
quiet, under that load, and quiet again:

* fresh ``exists``: a new client each time (TCP connect, TLS handshake with a proxy,
  request, answer), ``--requests`` of them spread over ``--seconds``, latency p50 / p99 / max;
* upload throughput: curl ``-T`` of ``--size-mib`` MiB to ``/pubapi/publish`` (median of
  ``--runs``; quiet before and after the attack), and the ratio loaded / quiet.

    python -m tests.bench.bench_front_door [--idle 1000] [--drips 100] [--requests 300]
                     [--seconds 30] [--size-mib 256] [--runs 3] [--dir .bench]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import selectors
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spool import Spool
from tests.bench.bench_ingest import cpu_seconds, curl_upload, peak_rss_mib
from tests.pki import IngestProcess, TestPKI, ingest_config
from tests.rawhttp import Client, ensure_open_files, get

MIB = 1 << 20
PER_ADDRESS = 50
DRIP_EVERY = 0.1


def source(i: int, net: int) -> str:
    return f"127.0.{net}.{1 + i // PER_ADDRESS}"


class Attacker:
    """The attacking side, run in a process of its own: idle and dripping connections."""

    def __init__(self, host: str, port: int, ca: Path, idle: int, drips: int) -> None:
        self.host, self.port = host, port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.selector = selectors.DefaultSelector()
        self.idle: list[socket.socket | None] = [None] * idle
        self.drips: list[ssl.SSLSocket | None] = [None] * drips
        self.reopened = 0

    def _open_idle(self, i: int) -> None:
        sock = socket.create_connection((self.host, self.port), 30,
                                        source_address=(source(i, 10), 0))
        self.selector.register(sock, selectors.EVENT_READ, ("idle", i))
        self.idle[i] = sock

    def _open_drip(self, i: int) -> None:
        raw = socket.create_connection((self.host, self.port), 30,
                                       source_address=(source(i, 30), 0))
        tls = self.context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"GET /pubapi/ping HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        tls.setblocking(False)
        self.selector.register(tls, selectors.EVENT_READ, ("drip", i))
        self.drips[i] = tls

    def _reopen(self, kind: str, i: int) -> None:
        sock = (self.idle if kind == "idle" else self.drips)[i]
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()
        self.reopened += 1
        try:
            (self._open_idle if kind == "idle" else self._open_drip)(i)
        except OSError:
            (self.idle if kind == "idle" else self.drips)[i] = None

    def run(self, ready: Any, stop: Any, stats: Any) -> None:
        for i in range(len(self.idle)):
            self._open_idle(i)
        for i in range(len(self.drips)):
            self._open_drip(i)
        ready.set()
        next_drip = time.monotonic()
        while not stop.is_set():
            for key, _ in self.selector.select(max(0.0, next_drip - time.monotonic())):
                self._reopen(*key.data)  # an answer (408) or a close: the server cut it off
            if time.monotonic() >= next_drip:
                next_drip += DRIP_EVERY
                for i, sock in enumerate(self.drips):
                    try:
                        if sock is None:
                            raise OSError
                        sock.send(b"a")
                    except (ssl.SSLWantWriteError, BlockingIOError):
                        pass
                    except OSError:
                        self._reopen("drip", i)
            for i, sock in enumerate(self.idle):
                if sock is None:
                    self._reopen("idle", i)
        stats.value = self.reopened
        for sock in [*self.idle, *self.drips]:
            if sock is not None:
                sock.close()


def attack(host: str, port: int, ca: Path, idle: int, drips: int, ready: Any, stop: Any,
           stats: Any) -> None:
    """The attacker process's entry point."""
    ensure_open_files(idle + drips + 256)
    Attacker(host, port, ca, idle, drips).run(ready, stop, stats)


def fresh_exists(client: Client, count: int, every: float = 0.0) -> list[float]:
    """Latencies (s) of ``count`` fresh clients asking ``exists``, one every ``every`` s."""
    out = []
    begin = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, begin + i * every - time.monotonic()))
        started = time.monotonic()
        answer = client.exchange(get(f"/pubapi/exists?cid=bench/fresh{i}"))
        out.append(time.monotonic() - started)
        if answer.text != "MISSING\n":
            raise RuntimeError(f"exists answered {answer}")
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def front_door(plain: Client) -> dict[str, float]:
    """The front-door metrics of the HTTPS listener: connections by state, events."""
    text = plain.exchange(get("/metrics")).text
    out = {}
    for labels, value in re.findall(r"^userpub_(?:connections|front_door_events_total)"
                                    r"\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if tags.get("listener") == "https":
            out[tags.get("state") or tags["event"]] = float(value)
    return out


def uploads(label: str, url: str, upload: Path, pki: TestPKI, spool: Spool, runs: int
            ) -> list[float]:
    """Seconds of ``runs`` uploads (each spool entry removed after it, so that every upload
    finds the page cache in the same state)."""
    seconds = []
    for i in range(runs):
        seconds.append(curl_upload(f"{url}/pubapi/publish?cid=bench/{label}{i}", upload, pki,
                                   "POST", "proxy"))
        for entry in spool.incoming.iterdir():
            shutil.rmtree(entry)
    print(f"{label:7s} upload {upload.stat().st_size / MIB:.0f} MiB: "
          + " ".join(f"{s:.2f}" for s in seconds) + " s")
    return seconds


def report_latency(label: str, latencies: list[float]) -> None:
    print(f"{label:7s} fresh exists ({len(latencies)}): p50 {percentile(latencies, 0.5) * 1000:.1f}"
          f" ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--drips", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="spread the fresh requests of a phase over this long (longer "
                        "than the handshake and header timeouts: the attacker's connections "
                        "are cut off and reopened meanwhile)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=".bench")
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("skipped: curl is not installed (apt-get install curl)")
        return 0
    base_dir = Path(args.dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    if shutil.disk_usage(base_dir).free < size * 4:
        print(f"skipped: needs {size * 4 >> 20} MiB free in {base_dir}")
        return 0
    ensure_open_files(args.idle + args.drips + 1024)
    work = Path(tempfile.mkdtemp(prefix="front-door-", dir=base_dir))
    try:
        return _run(work, size, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, size: int, args: argparse.Namespace) -> int:
    pki = TestPKI(work / "pki")
    upload = work / "upload.tar"
    block = os.urandom(MIB)
    with upload.open("wb") as fh:
        for _ in range(size // MIB):
            fh.write(block)
    config = ingest_config(work / "site", pki, max_upload_bytes=size + MIB, threads=16,
                           socket_timeout=60.0)
    server = IngestProcess(config, work / "ingest.log")
    host, _, port = server.https.rpartition(":")
    assert server.http is not None
    plain = Client(host, int(server.http.rpartition(":")[2]))
    client = Client(host, int(port), ca=pki.ca_file, credential=pki["proxy"])
    url = f"https://{server.https}"
    context = multiprocessing.get_context("fork")
    ready, stop, reopened = context.Event(), context.Event(), context.Value("i", 0)
    attacker = context.Process(target=attack, args=(host, int(port), pki.ca_file, args.idle,
                                                    args.drips, ready, stop, reopened))
    spool = Spool(config.server.spool)
    every = args.seconds / args.requests
    try:
        print(f"userpub ingest, 16 threads, default limits; per phase {args.requests} fresh "
              f"exists over {args.seconds:.0f} s and {args.runs} uploads")
        fresh_exists(client, 20)  # warm-up
        uploads("warm-up", url, upload, pki, spool, 1)
        cpu = cpu_seconds([server.pid])
        quiet = fresh_exists(client, args.requests, every)
        quiet_cpu = cpu_seconds([server.pid]) - cpu
        report_latency("quiet", quiet)
        quiet_up = uploads("quiet", url, upload, pki, spool, args.runs)
        attacker.start()
        if not ready.wait(300):
            raise RuntimeError("the attacker did not get its connections open")
        held = before = front_door(plain)
        print(f"attack: {args.idle} idle + {args.drips} slow-drip connections open (the server "
              f"holds {held.get('front', 0):.0f} in its front stage, "
              f"{held.get('worker', 0):.0f} with workers), reopened as soon as it closes them")
        cpu, attacker_cpu = cpu_seconds([server.pid]), cpu_seconds([attacker.pid or 0])
        loaded = fresh_exists(client, args.requests, every)
        loaded_cpu = cpu_seconds([server.pid]) - cpu
        attacker_cpu = cpu_seconds([attacker.pid or 0]) - attacker_cpu
        report_latency("loaded", loaded)
        print(f"CPU during the fresh requests: server {quiet_cpu:.1f} s quiet, {loaded_cpu:.1f} s "
              f"loaded; the attacker {attacker_cpu:.1f} s (of {args.seconds:.0f} s, 2 cores "
              "shared)")
        loaded_up = uploads("loaded", url, upload, pki, spool, args.runs)
        held = front_door(plain)
        stop.set()
        attacker.join(60)
        events = {k: int(v - before.get(k, 0)) for k, v in held.items()
                  if k not in ("front", "worker") and v > before.get(k, 0)}
        print(f"the server cut off {reopened.value} attacking connections meanwhile: {events}")
        quiet_up += uploads("quiet", url, upload, pki, spool, args.runs)  # drift check
        rate = {k: size / MIB / statistics.median(v)
                for k, v in (("quiet", quiet_up), ("loaded", loaded_up))}
        print(f"upload throughput: quiet {rate['quiet']:.0f} MiB/s (before and after), loaded "
              f"{rate['loaded']:.0f} MiB/s: ratio loaded/quiet {rate['loaded'] / rate['quiet']:.2f}")
        print(f"fresh exists p99 loaded/quiet: "
              f"{percentile(loaded, 0.99) / percentile(quiet, 0.99):.2f}")
        print(f"userpub server peak RSS: {peak_rss_mib(server.pid):.1f} MiB")
    finally:
        stop.set()
        if attacker.is_alive():
            attacker.join(60)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
