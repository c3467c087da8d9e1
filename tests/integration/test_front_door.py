"""The front door of a real ``userpub ingest`` under hostile connections (issue 19, point 1).

Silent connections, heads dripping in a byte at a time, refused uploads whose bodies trickle
in: none of them holds a worker thread, so a fresh request is answered while they are all
still open; they are bounded by time (handshake, header, idle timeouts: each ends with a
close or a 408, never a hang) and by count (per client address: a 503 with Retry-After, then a
close; in all: the connection idle longest makes room). Raw sockets only, real TLS.

The assertions are on events (answered, still open, closed), never on durations; timeouts are
hang guards. "Within a second" is measured by ``python -m tests.bench.bench_front_door``.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import publishers_alive, wait_for
from tests.integration.test_hostile_support import IngestDaemon
from tests.pki import TestPKI, ingest_config
from tests.rawhttp import (
    Answer,
    Client,
    ensure_open_files,
    get,
    is_closed,
    many,
    read_answer,
    wait_closed,
)

LONG = 600.0  # a timeout no test waits for


class Door:
    """A real ``userpub ingest`` (HTTPS and plain HTTP) and raw clients for it."""

    def __init__(self, directory: Path, **ingest: object) -> None:
        self.pki = TestPKI(directory / "pki")
        self.config = ingest_config(directory / "site", self.pki, repos=1, **ingest)
        self._alive = publishers_alive(self.config)  # so that ping answers OK
        self._alive.__enter__()
        self.ingest = IngestDaemon(self.config.path, directory / "ingest.log")
        host, _, port = self.ingest.https.rpartition(":")
        assert self.ingest.http is not None
        _, _, plain_port = self.ingest.http.rpartition(":")
        self.tls = Client(host, int(port), ca=self.pki.ca_file, credential=self.pki["proxy"])
        self.anonymous = Client(host, int(port), ca=self.pki.ca_file)
        self.plain = Client(host, int(plain_port))

    def exists(self, cid: str = "grp/fresh", source: str = "127.0.0.1") -> Answer:
        return self.tls.exchange(get(f"/pubapi/exists?cid={cid}"), source)

    def publish(self, cid: str, data: bytes) -> Answer:
        return self.tls.exchange(b"POST /pubapi/publish?cid=%s HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: %d\r\n\r\n" % (cid.encode(), len(data))
                                 + data)

    def connections(self, listener: str = "https") -> int:
        """Open connections of ``listener``, from the server's metrics."""
        text = self.plain.exchange(get("/metrics")).text
        found = re.findall(rf'userpub_connections{{listener="{listener}",state="\w+"}} (\S+)',
                           text)
        assert len(found) == 2, text
        return int(sum(float(n) for n in found))

    def alive(self) -> None:
        assert self.ingest.proc.poll() is None, self.ingest.log()
        assert self.exists().text == "MISSING\n"

    def stop(self) -> None:
        try:
            assert self.ingest.stop(timeout=120) == 0, self.ingest.log()
        finally:
            self._alive.__exit__(None, None, None)


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    """The example's 16 threads and default connection limits; timeouts no test reaches."""
    ensure_open_files(4096)
    door = Door(tmp_path_factory.mktemp("patient"), threads=16, handshake_timeout=LONG,
                header_timeout=LONG, idle_timeout=LONG, socket_timeout=LONG)
    try:
        yield door
    finally:
        door.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    """Few connections allowed (32, 8 per client), timeouts no test reaches."""
    door = Door(tmp_path_factory.mktemp("small"), threads=4, max_connections=32,
                max_connections_per_client=8, handshake_timeout=LONG, header_timeout=LONG,
                idle_timeout=LONG)
    try:
        yield door
    finally:
        door.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    """Short timeouts, so that the tests see them end connections."""
    door = Door(tmp_path_factory.mktemp("strict"), threads=4, handshake_timeout=1.0,
                header_timeout=2.0, idle_timeout=2.0, socket_timeout=2.0)
    try:
        yield door
    finally:
        door.stop()


def source(i: int, per_address: int = 50, net: int = 1) -> str:
    """Source addresses of loopback, ``per_address`` connections each (below the limit)."""
    return f"127.0.{net}.{1 + i // per_address}"


# -- no worker held: served while they are open -------------------------------------------


@pytest.mark.parametrize("count", [16, 200, 1000])
def test_idle_connections_hold_no_worker(patient: Door, count: int) -> None:
    with many([]) as idle:
        for i in range(count):
            idle.append(patient.tls.tcp(source(i)))
        # accepted in order: once a later connection is answered, every idle one was taken
        assert patient.exists().text == "MISSING\n"
        assert patient.publish(f"grp/idle{count}", bytes(5002)).text == "OK\n"
        assert patient.exists().text == "MISSING\n"
        assert [i for i, sock in enumerate(idle) if is_closed(sock)] == []  # all still open
    patient.alive()


class Dripper(threading.Thread):
    """Sends ``requests`` on ``socks`` a byte at a time, round robin, all but their last two
    bytes; then waits for ``finish`` and sends those."""

    def __init__(self, socks: list, requests: list[bytes]) -> None:
        super().__init__(daemon=True, name="dripper")
        self.socks, self.requests = socks, requests
        self.paused = threading.Event()
        self.finish = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for pos in range(max(len(r) for r in self.requests) - 2):
                for sock, request in zip(self.socks, self.requests, strict=True):
                    if pos < len(request) - 2:
                        sock.sendall(request[pos:pos + 1])
            self.paused.set()
            assert self.finish.wait(300)
            for sock, request in zip(self.socks, self.requests, strict=True):
                sock.sendall(request[-2:])
        except BaseException as err:
            self.error = err
            self.paused.set()


def drip_then_finish(door: Door, client: Client, socks: list, requests: list[bytes]) -> None:
    """Drip ``requests``; while every head is incomplete a fresh request must be answered;
    then finish them: each connection gets its own answer."""
    dripper = Dripper(socks, requests)
    dripper.start()
    assert dripper.paused.wait(300) and dripper.error is None, dripper.error
    assert door.exists().text == "MISSING\n"  # while 100 heads are incomplete
    assert [i for i, sock in enumerate(socks) if is_closed(sock)] == []
    dripper.finish.set()
    dripper.join(60)
    assert dripper.error is None, dripper.error
    for i, sock in enumerate(socks):
        answer = read_answer(sock)
        assert answer.status == 200, (i, answer)


def test_slow_drip_heads_hold_no_worker(patient: Door) -> None:
    with many([]) as socks:
        for i in range(100):
            socks.append(patient.tls.connect(source(i, net=2)))
        requests = [get(f"/pubapi/exists?cid=drip/{i}") for i in range(100)]
        drip_then_finish(patient, patient.tls, socks, requests)
        # the same connections, kept alive: their next heads drip in too
        requests = [get(f"/pubapi/status?cid=drip/{i}") for i in range(100)]
        drip_then_finish(patient, patient.tls, socks, requests)
    patient.alive()


def test_the_plain_listener_is_guarded_too(patient: Door) -> None:
    with many([]) as idle, many([]) as drips:
        for i in range(300):
            idle.append(patient.plain.tcp(source(i, net=3)))
        for i in range(50):
            drips.append(patient.plain.connect(source(i, net=4)))
        dripper = Dripper(drips, [get("/pubapi/ping")] * 50)
        dripper.start()
        assert dripper.paused.wait(300) and dripper.error is None
        assert patient.plain.exchange(get("/pubapi/ping")).text == "OK\n"
        assert patient.plain.exchange(get("/metrics")).status == 200
        assert [i for i, sock in enumerate(idle) if is_closed(sock)] == []
        dripper.finish.set()
        dripper.join(60)
        assert [read_answer(s).text for s in drips] == ["OK\n"] * 50
    patient.alive()


# -- count limits ---------------------------------------------------------------------------


def test_per_client_limit_503_then_close(small: Door) -> None:
    mine, other = "127.0.5.1", "127.0.5.2"
    with many([]) as held:
        for _ in range(8):  # the limit
            held.append(small.tls.tcp(mine))
        # the next 8 are answered 503 once their head is in ...
        answer = small.tls.exchange(get("/pubapi/exists?cid=a"), mine)
        assert (answer.status, answer.headers["retry-after"]) == (503, "5"), answer
        assert answer.headers["connection"] == "close"
        assert answer.text == "Too many connections from your address, try again later\n"
        for _ in range(8):
            held.append(small.tls.tcp(mine))
        # ... and the one after those is closed at once, before any TLS
        with small.tls.tcp(mine) as sock:
            assert wait_closed(sock) == b""
        # other addresses are served meanwhile
        assert small.exists(source=other).text == "MISSING\n"
    # all closed: served again once the server has seen the closes
    wait_for(lambda: small.connections() == 0, 30)
    assert small.exists(source=mine).text == "MISSING\n"


def test_when_full_the_connection_idle_longest_makes_room(small: Door) -> None:
    wait_for(lambda: small.connections() == 0, 30)  # the previous test's are gone
    with many([]) as idle:
        for i in range(32):  # max_connections, 8 per address
            idle.append(small.tls.tcp(source(i, per_address=8, net=6)))
        assert small.exists().text == "MISSING\n"  # a new client is served ...
        wait_for(lambda: is_closed(idle[0]), 30)  # ... in place of the oldest idle one
        assert [i for i, sock in enumerate(idle) if is_closed(sock)] == [0]
    small.alive()


# -- time limits ----------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_handshake_timeout(strict: Door) -> None:
    with strict.tls.tcp() as sock:
        assert wait_closed(sock) == b""
    with strict.plain.tcp() as sock:  # plain HTTP: after the header timeout
        assert wait_closed(sock) == b""
    strict.alive()


def test_a_silent_tls_connection_is_closed_without_an_answer(strict: Door) -> None:
    with strict.tls.connect() as sock:
        assert wait_closed(sock) == b""


def test_an_incomplete_head_gets_408(strict: Door) -> None:
    for client in (strict.tls, strict.plain):
        with client.connect() as sock:
            sock.sendall(b"GET /pubapi/ping HTTP/1.1\r\nHost: x\r\n")
            answer = read_answer(sock)
            assert answer.status == 408 and "Request timeout" in answer.text
            assert wait_closed(sock) == b""


def test_a_head_dripping_for_ever_gets_408(strict: Door) -> None:
    stop = threading.Event()
    with strict.tls.connect() as sock:

        def drip() -> None:
            try:
                while not stop.wait(0.2):
                    sock.sendall(b"X")
            except OSError:
                pass

        dripper = threading.Thread(target=drip, daemon=True)
        sock.sendall(b"GET /pubapi/ping HTTP/1.1\r\nX-Slow: ")
        dripper.start()
        try:
            answer = read_answer(sock)
        finally:
            stop.set()
            dripper.join(10)
        assert answer.status == 408


def test_an_idle_keep_alive_connection_is_closed(strict: Door) -> None:
    with strict.tls.connect() as sock:
        sock.sendall(get("/pubapi/exists?cid=a"))
        assert read_answer(sock).text == "MISSING\n"
        assert wait_closed(sock) == b""


def test_refused_uploads_trickling_their_bodies_hold_no_worker(strict: Door) -> None:
    """As many anonymous uploads as there are threads, each announcing a large body and
    sending it a byte at a time: each gets its 403, and a fresh request is answered while
    they are all still sending (the server lingers on them without a worker)."""
    stop = threading.Event()
    resets: list[int] = []
    with many([]) as socks:
        for _ in range(4):
            sock = strict.anonymous.connect()
            sock.sendall(b"POST /pubapi/publish?cid=grp/x HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1000000000\r\n\r\n" + bytes(100))
            socks.append(sock)
        answers = [read_answer(s) for s in socks]
        assert [(a.status, a.text) for a in answers] == [(403, "Token or client cert required\n")] * 4

        def trickle(i: int, sock) -> None:  # until the server has closed for good
            try:
                while not stop.wait(0.2):
                    sock.sendall(b"t")
            except OSError:
                resets.append(i)

        threads = [threading.Thread(target=trickle, args=(i, s), daemon=True)
                   for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        try:
            answer = strict.exists()
            still_sending = not resets
        finally:
            wait_for(lambda: len(resets) == 4, 60, "the lingering connections never ended")
            stop.set()
        assert answer.text == "MISSING\n" and still_sending


def test_the_servers_still_work(strict: Door, small: Door, patient: Door) -> None:
    for door in (strict, small, patient):
        door.alive()
        assert "Traceback" not in door.ingest.log()


def test_stop_finishes_uploads_in_flight_and_drops_waiting_connections(tmp_path: Path) -> None:
    door = Door(tmp_path, threads=4, handshake_timeout=LONG, header_timeout=LONG,
                idle_timeout=LONG)
    body = bytes(2_000_002)  # an empty tarball and zeros
    try:
        with many([]) as waiting, door.tls.connect() as upload:
            for i in range(100):
                waiting.append(door.tls.tcp(source(i, net=7)))
            for i in range(20):
                waiting.append(door.tls.connect(source(i, net=8)))  # handshaken, silent
            upload.sendall(b"POST /pubapi/publish?cid=grp/inflight HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body[:100_000])
            tmp = door.config.server.spool / "tmp"
            wait_for(lambda: any(tmp.iterdir()), 30, door.ingest.log)  # the upload is on
            door.ingest.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: refused(door), 30, "still accepting after SIGTERM")
            upload.sendall(body[100_000:])
            assert read_answer(upload).text == "OK\n"  # finished, although stopping
            for sock in waiting:  # closed, without an answer
                assert wait_closed(sock) == b""
        assert door.ingest.proc.wait(60) == 0, door.ingest.log()
    finally:
        door.stop()
    assert (door.config.server.spool / "incoming" / "grp%2Finflight").is_dir()


def refused(door: Door) -> bool:
    try:
        door.tls.tcp().close()
    except OSError:
        return True
    return False
