"""Malicious input over HTTPS against real processes (``userpub ingest`` and a publisher):
every request gets a clear answer, nothing is written outside a CID directory, and the server
keeps serving; after all of it a normal publish still works.

One site serves the whole module (the tests run in file order; the last one publishes normally
and checks the processes' logs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from spool import Spool
from tests.helpers import Daemon, make_tarball, wait_for
from tests.hostile import EXPECTED_ERRORS, HOSTILE_CASES, compress, reg, tar_bytes
from tests.integration.test_hostile_support import (
    REPO1,
    Api,
    IngestDaemon,
    expected_listing,
    listing,
    tune,
)
from tests.pki import TestPKI, ingest_config

H = b"Host: localhost\r\n"


class Site:
    """``userpub ingest`` and the publisher of the one repository, as real processes."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pki = TestPKI(directory / "pki")
        self.config = ingest_config(directory / "site", self.pki, http=False, repos=1,
                                    threads=6, socket_timeout=5.0, max_upload_bytes=32 << 20)
        # small limits keep the bombs of tests/hostile.py small (see CASE_LIMITS)
        tune(self.config.path, "publisher", max_members=200, max_unpacked_bytes=16 << 20)
        self.ingest = IngestDaemon(self.config.path, directory / "ingest.log")
        self.publisher = Daemon(self.config.path, "publisher", "--repo", REPO1,
                                log=directory / "publisher.log")
        self.publisher.wait_log("publisher ready")
        self.api = Api(self.ingest.https, self.pki)
        self.spool = Spool(self.config.server.spool)
        root = self.config.repositories[0].root
        assert root is not None
        self.root = root

    def final(self, cid: str, timeout: float = 60) -> str:
        """The status of ``cid`` once it is neither queued nor being published."""
        answer: list[str] = []

        def done() -> bool:
            answer[:] = [self.api.text("status", cid)]
            return answer[0] not in ("QUEUED\n", "PUBLISHING\n")

        wait_for(done, timeout, lambda: f"{cid} still {answer}\n{self.publisher.log()}")
        return answer[0]

    def alive(self) -> None:
        """Both processes run, and the server answers."""
        assert self.ingest.proc.poll() is None, self.ingest.log()
        assert self.publisher.proc.poll() is None, self.publisher.log()
        assert self.api.ping()
        assert self.api.text("exists", "grp/never") == "MISSING\n"

    def nothing_queued(self) -> bool:
        return not any(self.spool.incoming.iterdir()) and not any(self.spool.tmp.iterdir())

    def stop(self) -> None:
        self.publisher.stop()
        self.ingest.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("hostile-input"))
    try:
        yield s
    finally:
        s.stop()


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


def test_every_hostile_tarball_class_uploaded_over_https_is_refused_with_its_reason(


        site: Site) -> None:
    made = site.dir / "made"
    made.mkdir()
    outside = site.dir.parent
    before = listing(outside) - {p for p in listing(outside) if p.startswith(site.dir.name)}
    for name, build in HOSTILE_CASES.items():  # refused by the POST itself, with its reason
        with build(made).open("rb") as fh:
            r = site.api.publish(f"hostile/{name}", fh)
        assert r.status_code == 400 and r.text.startswith("Bad request: "), (name, r.text)
        assert EXPECTED_ERRORS[name] in r.text and r.text.count("\n") == 1, (name, r.text)
        assert site.nothing_queued(), name
    good = {"ok/file": b"fine", "ok/bin/run.sh": b"#!/bin/sh\n"}
    with make_tarball(made / "good.tar.gz", good).open("rb") as fh:
        assert site.api.publish("hostile/good", fh).text == "OK\n"
    for name in EXPECTED_ERRORS:
        assert site.final(f"hostile/{name}") == "MISSING\n", name
    assert site.final("hostile/good") == "PRESENT:/cvmfs/repo1.example.org/sw/hostile/good\n"
    # the good CID is complete; no hostile one left anything in the repository
    assert listing(site.root / "sw" / "hostile" / "good") == expected_listing(good)
    assert os.listdir(site.root / "sw" / "hostile") == ["good"]
    assert os.listdir(site.root / ".userpub" / "staging") == []
    assert all(n.endswith(".cid") for n in os.listdir(site.root / ".userpub" / "trash"))
    after = listing(outside) - {p for p in listing(outside) if p.startswith(site.dir.name)}
    assert after == before, "something was written outside the site"
    assert not Path("/tmp/evil.txt").exists()
    site.alive()


# (request bytes, expected status line prefix, a substring of the body)
MALFORMED = {
    "garbage request line": (b"\x00\x01\x02garbage\r\n\r\n", b"HTTP/1.1 400", b"Malformed"),
    "HTTP/0.9 request": (b"GET /pubapi/ping\r\n\r\n", b"HTTP/1.1 400", b"Malformed"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 505", b"Cannot"),
    "HTTP/3.0": (b"GET /pubapi/ping HTTP/3.0\r\n" + H + b"\r\n", b"HTTP/1.1 505", b""),
    "absolute URI": (b"GET https://evil/pubapi/ping HTTP/1.1\r\n" + H + b"\r\n",
                     b"HTTP/1.1 400", b"Absolute URI"),
    "oversized header": (b"GET /pubapi/ping HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 100_000
                         + b"\r\n\r\n", b"HTTP/1.1 413", b"headers"),
    "20000 headers": (b"GET /pubapi/ping HTTP/1.1\r\n" + H
                      + b"".join(b"X-%d: y\r\n" % i for i in range(20_000)) + b"\r\n",
                      b"HTTP/1.1 413", b"headers"),
    "100 kB URL": (b"GET /pubapi/exists?cid=" + b"a" * 100_000 + b" HTTP/1.1\r\n" + H + b"\r\n",
                   b"HTTP/1.1 414", b"Request-URI"),
    "unknown route": (b"GET /pubapi/nothing HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 404",
                      b"Unrecognized api"),
    "dot-dot route": (b"GET /pubapi/../pubapi/ping HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 404",
                      b"Unrecognized api"),
    "encoded-slash route": (b"GET /pubapi%2Fping HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 404",
                            b"Unrecognized api"),
    "control char in path": (b"GET /pubapi/ping\x01 HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 404",
                             b"Unrecognized api"),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 404", b"Unrecognized"),
    "BREW method": (b"BREW /pubapi/ping HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 405",
                    b"Method not allowed"),
    "GET publish": (b"GET /pubapi/publish?cid=a HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 405",
                    b"Method not allowed"),
    "PUT publish": (b"PUT /pubapi/publish?cid=a HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
                    b"HTTP/1.1 405", b"Method not allowed"),
    "DELETE exists": (b"DELETE /pubapi/exists?cid=a HTTP/1.1\r\n" + H + b"\r\n",
                      b"HTTP/1.1 405", b"Method not allowed"),
    "POST exists": (b"POST /pubapi/exists?cid=a HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
                    b"HTTP/1.1 405", b"Method not allowed"),
    "publish without cid": (b"POST /pubapi/publish HTTP/1.1\r\n" + H
                            + b"Content-Length: 0\r\n\r\n", b"HTTP/1.1 400", b"no cid"),
    "Content-Length abc": (b"POST /pubapi/publish?cid=g/abc HTTP/1.1\r\n" + H
                           + b"Content-Length: abc\r\n\r\n", b"HTTP/1.1 400", b"Content-Length"),
    "Content-Length -1": (b"POST /pubapi/publish?cid=g/neg HTTP/1.1\r\n" + H
                          + b"Content-Length: -1\r\n\r\n", b"HTTP/1.1 400", b"Content-Length"),
    "Transfer-Encoding gzip": (b"POST /pubapi/publish?cid=g/teg HTTP/1.1\r\n" + H
                               + b"Transfer-Encoding: gzip\r\n\r\nxx", b"HTTP/1.1 501", b""),
    "bad chunk size": (b"POST /pubapi/publish?cid=g/cb HTTP/1.1\r\n" + H
                       + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                       b"HTTP/1.1 400", b"malformed chunked body"),
    "chunk without CRLF": (b"POST /pubapi/publish?cid=g/cb2 HTTP/1.1\r\n" + H
                           + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
                           b"HTTP/1.1 400", b"malformed chunked body"),
    "chunk header line 5000 bytes": (b"POST /pubapi/publish?cid=g/cb3 HTTP/1.1\r\n" + H
                                     + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 5000,
                                     b"HTTP/1.1 400", b"malformed chunked body"),
    "NUL in cid": (b"GET /pubapi/exists?cid=a%00b HTTP/1.1\r\n" + H + b"\r\n", b"HTTP/1.1 400",
                   b"disallowed character in cid"),
    "invalid UTF-8 cid": (b"GET /pubapi/exists?cid=%ff%fe HTTP/1.1\r\n" + H + b"\r\n",
                          b"HTTP/1.1 400", b"disallowed character in cid"),
    "space in request line": (b"GET /pubapi/exists?cid=a b HTTP/1.1\r\n" + H + b"\r\n",
                              b"HTTP/1.1 400", b"Malformed"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_clear_answer_and_the_server_keeps_serving(
        site: Site, case: str) -> None:
    request, status, text = MALFORMED[case]
    answer = site.api.raw(request, timeout=20)
    assert status_line(answer).startswith(status), (case, answer[:300])
    assert text in body(answer), (case, answer[:300])
    site.alive()
    wait_for(site.nothing_queued, 15, lambda: f"{case} left {os.listdir(site.spool.incoming)}")


def test_not_tls_at_all_and_tls_garbage(site: Site) -> None:
    import socket

    # plain HTTP and random bytes on the TLS port: the handshake fails, the connection closes
    for junk in (b"GET /pubapi/ping HTTP/1.1\r\n\r\n", os.urandom(5000), b"\x16\x03\x01\xff\xff"):
        with socket.create_connection((site.api.host, site.api.port), timeout=20) as s, \
                contextlib.suppress(OSError):  # a reset: the server hung up at once
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        site.alive()
    # a TLS connection that says nothing and one closed at once
    with socket.create_connection((site.api.host, site.api.port), timeout=20):
        assert site.api.ping()
    site.api.connect().close()
    site.alive()


CRAFTED_CIDS = {
    "..%2F..%2Fetc": 'cid may not contain ".." components',
    "grp%2F..%2F..%2Fx": 'cid may not contain ".." components',
    "grp%2F..": 'cid may not contain ".." components',
    "%2E%2E": 'cid may not contain ".." components',
    "%2Fetc%2Fpasswd": 'cid may not start with "/"',
    "a%2F%2Fb%2Fc": "at most one slash allowed in cid",
    "a%2Fb%2Fc": "at most one slash allowed in cid",
    "a%00b": "disallowed character in cid",
    "a%0Ab": "disallowed character in cid",
    "a%27b": "disallowed character in cid",
    "a%22b": "disallowed character in cid",
    "a%60b": "disallowed character in cid",
    "a%5Cb": "disallowed character in cid",
    "caf%C3%A9": "disallowed character in cid",
    "x" * 256: "longer than 255",
    "": "with no cid",
}


@pytest.mark.parametrize("route", ["exists", "update", "status", "publish"])
def test_crafted_cids_are_refused_with_their_reason(site: Site, route: str) -> None:
    for raw, reason in CRAFTED_CIDS.items():
        url = f"{site.api.base}/pubapi/{route}?cid={raw}"
        kw: dict[str, Any] = {"cert": site.api.cert, "verify": site.api.verify, "timeout": 30}
        r = requests.post(url, data=b"x" * 1000, **kw) if route == "publish" else \
            requests.get(url, **kw)
        assert (r.status_code, r.reason) == (400, "Bad request"), (raw, r.text)
        assert r.text.startswith("Bad request: ") and reason in r.text, (raw, r.text)
    assert site.nothing_queued()
    site.alive()


def test_percent_encoded_slash_is_a_name_not_a_group(site: Site, tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "t.tar.gz", {"f": b"1"})
    for cid in ("a%2Fb", "x%2F..%2F..%2Fy", "%2E%2Ex"):
        with tarball.open("rb") as fh:
            assert site.api.publish(cid, fh).text == "OK\n"
        assert site.final(cid) == f"PRESENT:/cvmfs/repo1.example.org/sw/{cid}\n"
        assert (site.root / "sw" / cid / "f").read_bytes() == b"1"
    assert not (site.root / "sw" / "a").exists() and not (site.root / "y").exists()


@pytest.mark.parametrize("cid", ["x" * 255, "!" * 120, "g/" + "~" * 253, "g/" + "=" * 200,
                                 "#" * 85 + "/" + "$" * 85])
def test_longest_cids_publish_and_stamp(site: Site, tmp_path: Path, cid: str) -> None:
    """Valid CIDs of every shape up to 255 characters, also those whose spool names (each
    special character percent-encoded) would be longer than a file name may be."""
    tarball = make_tarball(tmp_path / "t.tar.gz", {"f": cid.encode()})
    with tarball.open("rb") as fh:
        r = site.api.publish(cid, fh)
    assert (r.status_code, r.text) == (200, "OK\n")
    present = f"PRESENT:/cvmfs/repo1.example.org/sw/{cid}\n"
    assert site.final(cid) == present
    assert (site.root / "sw" / cid / "f").read_bytes() == cid.encode()
    assert site.api.text("update", cid) == present  # queues an access stamp
    stamp = site.root / "ts" / cid
    wait_for(stamp.is_file, 30, site.publisher.log)
    with tarball.open("rb") as fh:  # published: a stamp again, the body read and discarded
        assert site.api.publish(cid, fh).text == present
    wait_for(site.nothing_queued, 30, site.publisher.log)
    site.alive()


def test_empty_short_and_long_bodies(site: Site) -> None:
    # an empty body is refused with its reason
    answer = site.api.raw(b"POST /pubapi/publish?cid=g/empty HTTP/1.1\r\n" + H
                          + b"Content-Length: 0\r\n\r\n")
    assert status_line(answer) == b"HTTP/1.1 400 Bad request"
    assert body(answer) == b"Bad request: empty file\n"
    assert site.final("g/empty") == "MISSING\n"
    # shorter than its Content-Length: the client stops sending and closes its side
    tarball = compress(tar_bytes([reg("f", b"x" * 10_000)]), "gzip")
    with site.api.connect() as tls:
        tls.sendall(b"POST /pubapi/publish?cid=g/short HTTP/1.1\r\n" + H
                    + b"Content-Length: %d\r\n\r\n" % (len(tarball) + 100) + tarball)
        import socket

        with socket.socket(fileno=os.dup(tls.fileno())) as dup:
            dup.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert status_line(answer) == b"HTTP/1.1 400 Bad request"
    assert b"body shorter than Content-Length" in body(answer)
    assert site.api.text("status", "g/short") == "MISSING\n"
    # longer than its Content-Length: the extra bytes are the next request (a bad one)
    answer = site.api.raw(b"POST /pubapi/publish?cid=g/long HTTP/1.1\r\n" + H
                          + b"Content-Length: %d\r\n\r\n" % len(tarball) + tarball
                          + b"EXTRA BYTES THAT ARE NO REQUEST\r\n\r\n", until_close=True,
                          timeout=20)
    first, _, rest = answer.partition(b"OK\n")
    assert status_line(first) == b"HTTP/1.1 200 OK"
    assert rest.startswith(b"HTTP/1.1 400 Bad Request"), rest[:200]
    assert site.final("g/long") == "PRESENT:/cvmfs/repo1.example.org/sw/g/long\n"
    assert (site.root / "sw/g/long/f").read_bytes() == b"x" * 10_000
    site.alive()


def test_garbage_and_truncated_streams(site: Site) -> None:
    # all zeros is an empty archive (the end-of-archive marker first): published empty
    assert site.api.publish("g/zeros", bytes(100_000)).text == "OK\n"
    cases = {
        "g/random": os.urandom(200_000),
        "g/half-gzip": compress(tar_bytes([reg(f"f{i}", os.urandom(3000)) for i in range(30)]),
                                "gzip")[:40_000],
        "g/gzip-of-random": compress(os.urandom(100_000), "gzip"),
        "g/tar-header-only": tar_bytes([reg("f", b"x" * 5000)])[:512],
    }
    for cid, data in cases.items():  # each refused by the POST, with the publisher's reason
        r = site.api.publish(cid, data)
        assert r.status_code == 400 and r.text.startswith("Bad request: "), (cid, r.text)
        assert any(w in r.text for w in ("not a tar", "truncated", "corrupt")), (cid, r.text)
    for cid in cases:
        assert site.final(cid) == "MISSING\n", cid
    assert site.final("g/zeros") == "PRESENT:/cvmfs/repo1.example.org/sw/g/zeros\n"
    assert listing(site.root / "sw/g/zeros") == expected_listing({})
    # a chunked upload cut off in the middle: nothing queued
    with site.api.connect() as tls:
        tls.sendall(b"POST /pubapi/publish?cid=g/cut HTTP/1.1\r\n" + H
                    + b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"c" * 30_000)
    wait_for(site.nothing_queued, 20)
    assert site.api.text("status", "g/cut") == "MISSING\n"
    site.alive()


def test_after_all_that_a_normal_publish_works(site: Site, tmp_path: Path) -> None:
    files = {"bin/run.sh": b"#!/bin/sh\necho ok\n", "lib/data.bin": os.urandom(300_000)}
    tarball = make_tarball(tmp_path / "code.tar.gz", files)
    cid = "fermilab/" + hashlib.sha256(tarball.read_bytes()).hexdigest()
    started = time.monotonic()
    with tarball.open("rb") as fh:
        assert site.api.publish(cid, fh).text == "OK\n"
    assert site.final(cid) == f"PRESENT:/cvmfs/repo1.example.org/sw/{cid}\n"
    assert time.monotonic() - started < 30
    target = site.root / "sw" / cid
    assert listing(target) == expected_listing(files)
    assert (target / "lib/data.bin").read_bytes() == files["lib/data.bin"]
    site.alive()
    # no answer was a 500 (cheroot's own tracebacks of clients gone mid-answer are no error)
    assert "status=500" not in site.ingest.log()
    assert "Traceback" not in site.publisher.log()
    assert "not empty after commit" not in site.publisher.log()
