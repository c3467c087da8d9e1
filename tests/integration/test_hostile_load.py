"""Load and slow clients against a real ``userpub ingest``.

* 50 concurrent uploads of mixed sizes with a steady stream of ``exists`` requests: every
  answer right, every upload queued whole and then published, the server's memory bounded
  (the same machinery as ``python -m tests.bench.bench_load``, smaller).
* Slow clients: a client that stops sending and one whose body trickles in each hold a
  worker thread, but not for ever: with every worker taken by such clients, the server
  still answers an ``exists`` within a few ``socket_timeout``.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool import Spool
from tests.bench.bench_load import (
    LoadSite,
    check_queued,
    make_tarballs,
    mixed_sizes,
    report,
    run_load,
)
from tests.helpers import Daemon, tar_body, wait_for
from tests.integration.test_hostile_support import Api, IngestDaemon
from tests.pki import TestPKI, ingest_config

MIB = 1 << 20
SlowSite = tuple[Api, IngestDaemon, Spool]


def test_50_concurrent_uploads_with_a_stream_of_exists(


        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tarballs = make_tarballs(tmp_path / "tarballs", mixed_sizes(50, 0.05))  # 13 MB in all
    site = LoadSite(tmp_path, threads=32)
    try:
        result = run_load(site.base, site.pki, site.ingest.proc.pid, tarballs, site.present,
                          exists_threads=3, exists_rate=30)
        assert site.ingest.proc.poll() is None
    finally:
        site.stop()
    with capsys.disabled():
        report(result, lambda line: print("  " + line))
    assert result.errors == []
    assert len(result.upload_latency) == 50
    assert len(result.exists_latency) >= 10
    assert check_queued(site.config, result) == []
    assert result.peak_rss_kib < 200 * 1024, result.peak_rss_kib
    # and the publishers take them all
    publishers = [Daemon(site.config.path, "publisher", "--repo", r.name,
                         log=tmp_path / f"publisher-{r.name}.log")
                  for r in site.config.repositories]
    spool = Spool(site.config.server.spool)
    try:
        for p in publishers:  # a SIGTERM before a daemon's handlers are installed kills it
            p.wait_log("publisher ready", timeout=60)
        wait_for(lambda: spool.depth().incoming == 0 and not any(spool.depth().active.values()),
                 120, publishers[0].log)
    finally:
        for p in publishers:
            assert p.stop() == 0
    roots = [r.root for r in site.config.repositories if r.root is not None]
    for cid in tarballs:
        assert sum((root / "sw" / cid / ".publisher").exists() for root in roots) == 1, cid


class SlowClient(threading.Thread):
    """Starts an upload, then sends ``step`` bytes every ``every`` seconds (never, if
    ``every`` is None) until the server answers or hangs up; ``answer`` is what it got."""

    def __init__(self, api: Api, cid: str, every: float | None, step: int = 1) -> None:
        super().__init__(daemon=True, name=f"slow-{cid}")
        self.api, self.cid, self.every, self.step = api, cid, every, step
        self.answer = b""
        self.started = threading.Event()
        self.ended = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with self.api.connect(timeout=120) as tls:
                tls.sendall(b"POST /pubapi/publish?cid=%s HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 10000000\r\n\r\n" % self.cid.encode()
                            + bytes(2002))
                self.started.set()
                tls.settimeout(self.every or 120)
                while not self.stop.is_set():
                    try:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        self.answer += chunk  # until the server closes
                    except (TimeoutError, ssl.SSLWantReadError):
                        if self.every is not None:
                            tls.sendall(b"t" * self.step)
        except OSError as err:
            self.answer = self.answer or repr(err).encode()
        finally:
            self.started.set()
            self.ended = time.monotonic()


@pytest.fixture
def slow_site(tmp_path: Path) -> Iterator[SlowSite]:
    pki = TestPKI(tmp_path / "pki")
    config = ingest_config(tmp_path / "site", pki, http=False, repos=1, threads=4,
                           socket_timeout=2.0)
    ingest = IngestDaemon(config.path, tmp_path / "ingest.log")
    try:
        yield Api(ingest.https, pki), ingest, Spool(config.server.spool)
    finally:
        ingest.stop(timeout=120)


def exists_takes(api: Api, timeout: float = 60) -> float:
    started = time.monotonic()
    assert api.text("exists", "grp/x") == "MISSING\n"
    return time.monotonic() - started


@pytest.mark.parametrize(("kind", "every"), [("stalled", None), ("trickling", 0.5)])
def test_slow_clients_on_every_worker_do_not_stop_the_server(
        slow_site: SlowSite, kind: str, every: float | None) -> None:
    api, ingest, spool = slow_site
    clients = [SlowClient(api, f"grp/{kind}{i}", every) for i in range(4)]  # = threads
    for c in clients:
        c.start()
        assert c.started.wait(30)
    wait_for(lambda: len(list(spool.tmp.iterdir())) == 4, 30, ingest.log)  # 4 workers busy
    try:
        # every worker is held: the request waits, but only until the slow ones are cut off
        took = exists_takes(api)
        assert took < 5 * 2.0 + 5, f"exists answered after {took:.1f} s"
        for c in clients:
            c.join(30)
        assert all(not c.is_alive() for c in clients)
        for c in clients:
            assert c.answer.startswith(b"HTTP/1.1 400 Bad request"), c.answer[:200]
            assert b"upload timed out after" in c.answer, c.answer[:300]
    finally:
        for c in clients:
            c.stop.set()
    wait_for(lambda: list(spool.tmp.iterdir()) == [] and list(spool.incoming.iterdir()) == [],
             20, ingest.log)
    assert exists_takes(api) < 2
    assert ingest.proc.poll() is None


def test_one_slow_client_does_not_delay_the_others(slow_site: SlowSite) -> None:
    api, ingest, spool = slow_site
    slow = [SlowClient(api, f"grp/slow{i}", every) for i, every in enumerate((None, 0.5, 0.5))]
    for c in slow:
        c.start()
    try:
        wait_for(lambda: len(list(spool.tmp.iterdir())) == 3, 30, ingest.log)
        for _ in range(20):  # one worker is free: it answers at once, again and again
            assert exists_takes(api) < 1.5
        assert api.publish("grp/fast", tar_body(MIB)).text == "OK\n"
    finally:
        for c in slow:
            c.stop.set()
        for c in slow:
            c.join(30)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: list(spool.tmp.iterdir()) == [], 20)
    assert [p.name for p in spool.incoming.iterdir()] == ["grp%2Ffast"]
