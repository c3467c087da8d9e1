"""Request framing over real TLS (issue 19, points 2-5): no request can be smuggled.

Every request whose body length is ambiguous or malformed -- two Content-Length headers,
Content-Length with Transfer-Encoding, lax numbers, chunked in HTTP/1.0, obsolete line folding
-- is answered once (400, or 501 for an unknown coding) and its connection closed: the bytes
after it, here always a second "smuggled" request, are never parsed. Raw sockets only; the
server is the real one (cheroot, TLS) in this process, so its metrics and spool are at hand.
Then the same through nginx as a reverse proxy keeping connections to us alive: every request
we served is one nginx forwarded, and a victim on another connection gets its own answer.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool import Spool
from tests.helpers import publishers_alive, wait_for
from tests.pki import TestPKI, ingest_config, running_ingest
from tests.rawhttp import Answer, Client, get, read_answer, wait_closed
from tests.requirements import tool

SMUGGLED = b"GET /pubapi/status?cid=smuggled/x HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /pubapi/publish?cid=grp/%s HTTP/1.1\r\nHost: x\r\n"


class Site:
    """The real ingest server in this process, raw TLS clients, its metrics and spool."""

    def __init__(self, directory: Path) -> None:
        self.pki = TestPKI(directory / "pki")
        # framing is judged here, not tarballs: the bodies are short words
        self.config = ingest_config(directory / "site", self.pki, http=False, repos=1,
                                    threads=4, check_uploads="off")
        self.spool = Spool(self.config.server.spool)
        self._alive = publishers_alive(self.config)
        self._alive.__enter__()
        self._running = running_ingest(self.config)
        self.bound, self.server = self._running.__enter__()
        self.port = self.bound.https[1]
        self.tls = Client("127.0.0.1", self.port, ca=self.pki.ca_file,
                          credential=self.pki["proxy"])

    def requests(self, route: str) -> float:
        """Requests answered on ``route``, whatever their status."""
        return sum(s.value for metric in self.server.registry.collect()
                   for s in metric.samples
                   if s.name == "userpub_http_requests_total" and s.labels["route"] == route)

    def queued(self) -> dict[str, bytes]:
        """Spool entries waiting in incoming/: CID file name -> payload."""
        return {p.name: self.spool.read_entry(p).payload.read_bytes()
                for p in self.spool.incoming.iterdir()}

    def nothing_left(self) -> bool:
        return not any(self.spool.incoming.iterdir()) and not any(self.spool.tmp.iterdir())

    def clear(self) -> None:
        for entry in self.spool.incoming.iterdir():
            shutil.rmtree(entry)

    def close(self) -> None:
        self._running.__exit__(None, None, None)
        self._alive.__exit__(None, None, None)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("framing"))
    try:
        yield s
    finally:
        s.close()


def chunked(body: bytes) -> bytes:
    return POST % b"c" + b"Transfer-Encoding: chunked\r\n\r\n" + body


# name: (request, expected status, text in the answer); SMUGGLED follows each one
REFUSED = {
    "two different Content-Length (10 then 5)": (
        POST % b"cl2" + b"Content-Length: 10\r\nContent-Length: 5\r\n\r\nAAAAABBBBB", 400,
        "more than one Content-Length"),
    "two identical Content-Length": (
        POST % b"cl2" + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nAAAAA", 400,
        "more than one Content-Length"),
    "Content-Length list": (POST % b"cl2" + b"Content-Length: 5, 5\r\n\r\nAAAAA", 400,
                            "invalid Content-Length"),
    "Content-Length and chunked": (
        POST % b"te" + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n", 400, "both Content-Length and Transfer-Encoding"),
    "chunked and Content-Length": (
        POST % b"te" + b"Transfer-Encoding: chunked\r\nContent-Length: 20\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n", 400, "both Content-Length and Transfer-Encoding"),
    "Content-Length +5": (POST % b"n" + b"Content-Length: +5\r\n\r\nhello", 400,
                          "invalid Content-Length"),
    "Content-Length 0_5": (POST % b"n" + b"Content-Length: 0_5\r\n\r\nhello", 400,
                           "invalid Content-Length"),
    "Content-Length 0x5": (POST % b"n" + b"Content-Length: 0x5\r\n\r\nhello", 400,
                           "invalid Content-Length"),
    "Content-Length -0": (POST % b"n" + b"Content-Length: -0\r\n\r\n", 400,
                          "invalid Content-Length"),
    "Content-Length 5 5": (POST % b"n" + b"Content-Length: 5 5\r\n\r\nhello", 400,
                           "invalid Content-Length"),
    "Content-Length empty": (POST % b"n" + b"Content-Length: \r\n\r\n", 400,
                             "invalid Content-Length"),
    "Content-Length in Arabic digits": (POST % b"n" + "Content-Length: \u0665\r\n\r\n".encode(),
                                        400, "invalid Content-Length"),
    "Content-Length of 19 digits": (POST % b"n" + b"Content-Length: 1" + b"0" * 18 + b"\r\n\r\n",
                                    400, "invalid Content-Length"),
    "chunk size 0x5": (chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "bad chunk size"),
    "chunk size 0_5": (chunked(b"0_5\r\nhello\r\n0\r\n\r\n"), 400, "bad chunk size"),
    "chunk size -0": (chunked(b"-0\r\n\r\n"), 400, "bad chunk size"),
    "chunk size +5": (chunked(b"+5\r\nhello\r\n0\r\n\r\n"), 400, "bad chunk size"),
    "chunk size with a space": (chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400, "bad chunk size"),
    "chunk size line ending in LF": (chunked(b"5\nhello\r\n0\r\n\r\n"), 400, "bad chunk size"),
    "chunk data ending in LF": (chunked(b"5\r\nhello\n0\r\n\r\n"), 400, "not followed by CRLF"),
    "last chunk ending in LF": (chunked(b"5\r\nhello\r\n0\n\n"), 400, "bad chunk size"),
    "chunk extension without a name": (chunked(b"5;\r\nhello\r\n0\r\n\r\n"), 400,
                                       "bad chunk size"),
    "malformed trailer": (chunked(b"5\r\nhello\r\n0\r\nno colon\r\n\r\n"), 400, "bad trailer"),
    "HTTP/1.0 with chunked": (
        b"POST /pubapi/publish?cid=grp/ten HTTP/1.0\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400,
        "Transfer-Encoding in an HTTP/1.0 request"),
    "chunked twice": (POST % b"c2" + b"Transfer-Encoding: chunked, chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n", 400, "invalid Transfer-Encoding"),
    "chunked on two lines": (POST % b"c2" + b"Transfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400,
                             "invalid Transfer-Encoding"),
    "empty Transfer-Encoding": (POST % b"c2" + b"Transfer-Encoding: \r\n\r\nhello", 400,
                                "invalid Transfer-Encoding"),
    "gzip then chunked": (POST % b"gz" + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                          b"5\r\nhello\r\n0\r\n\r\n", 501, "only the chunked"),
    "whitespace before the colon": (POST % b"ws" + b"Content-Length : 5\r\n\r\nhello", 400,
                                    "invalid header name"),
    "obsolete line folding": (POST % b"of" + b"X-A: b\r\n c\r\nContent-Length: 5\r\n\r\nhello",
                              400, "obsolete line folding"),
    "folded Content-Length": (POST % b"of" + b"Content-Length: 5\r\n 0\r\n\r\nhello", 400,
                              "obsolete line folding"),
    "bare CR in a value": (POST % b"cr" + b"X-A: b\rc\r\nContent-Length: 5\r\n\r\nhello", 400,
                           "control character"),
    "NUL in a value": (POST % b"nul" + b"X-A: b\x00c\r\nContent-Length: 5\r\n\r\nhello", 400,
                       "control character"),
    "two Host headers": (b"GET /pubapi/ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
                         "more than one Host"),
    "bare LF line ends": (b"POST /pubapi/publish?cid=grp/lf HTTP/1.1\nHost: x\n"
                          b"Content-Length: 5\n\nhello", 400, "CRLF"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_ambiguous_framing_is_refused_and_the_rest_never_parsed(site: Site, case: str) -> None:
    request, status, text = REFUSED[case]
    before = site.requests("status")
    with site.tls.connect() as sock:
        sock.sendall(request + SMUGGLED)
        answer = read_answer(sock)
        assert answer.status == status and text in answer.text, (case, answer)
        assert answer.headers.get("connection") == "close", (case, answer)
        assert wait_closed(sock) == b""  # one answer, then closed: nothing more was parsed
    assert site.requests("status") == before  # the smuggled request never ran
    wait_for(site.nothing_left, 10, lambda: f"{case}: {site.queued()}")  # no framing stored


def exchange_all(site: Site, data: bytes, count: int) -> list[Answer]:
    """Send ``data`` on one connection and read ``count`` answers."""
    with site.tls.connect() as sock:
        sock.sendall(data)
        pending = bytearray()
        return [read_answer(sock, pending) for _ in range(count)]


def test_valid_framing_still_works_pipelined(site: Site) -> None:
    requests = [
        POST % b"p1" + b"Content-Length: 005\r\n\r\nhello",  # 1*DIGIT: leading zeros are fine
        POST % b"p2" + b"Content-Length:   7  \r\n\r\nworld!!",  # OWS around the value
        POST % b"p3" + b"Transfer-Encoding: Chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6 ; quoted = \"a;b\"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        SMUGGLED,  # here a legitimate pipelined request
    ]
    answers = exchange_all(site, b"".join(requests), 4)
    assert [(a.status, a.text) for a in answers] == [(200, "OK\n")] * 3 + [(200, "MISSING\n")]
    assert site.queued() == {"grp%2Fp1": b"hello", "grp%2Fp2": b"world!!",
                             "grp%2Fp3": b"hello world"}
    site.clear()


def test_an_unread_body_is_skipped_exactly(site: Site) -> None:
    """A request refused before its body was read (403): the body, which looks like a request,
    is discarded; the request after it is parsed from the right place."""
    anonymous = Client("127.0.0.1", site.port, ca=site.pki.ca_file)
    body = SMUGGLED * 3
    before = site.requests("status")
    with anonymous.connect() as sock:
        sock.sendall(POST % b"anon" + b"Content-Length: %d\r\n\r\n" % len(body) + body
                     + get("/pubapi/ping"))
        pending = bytearray()
        first, second = read_answer(sock, pending), read_answer(sock, pending)
    assert (first.status, second.text) == (403, "OK\n")
    assert site.requests("status") == before


# -- a reverse proxy in front ---------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format forwarded '$request_uri $upstream_status';
    access_log {dir}/access.log forwarded;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream userpub {{ server 127.0.0.1:{upstream}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://userpub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_ssl_certificate {credential};
            proxy_ssl_certificate_key {credential};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
        }}
    }}
}}
"""


class Nginx:
    """nginx as a reverse proxy to ``upstream`` (HTTPS, upstream keep-alive)."""

    def __init__(self, directory: Path, upstream: int, pki: TestPKI) -> None:
        tool("nginx")  # the reverse proxy in front of the ingest
        directory.mkdir(parents=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.dir = directory
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=self.port, upstream=upstream,
                                          credential=pki["usercert"], ca=pki.ca_file))
        self.proc = subprocess.Popen(["nginx", "-p", str(directory), "-e",
                                      str(directory / "error.log"), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._up, 30, lambda: f"nginx did not start: {self.proc.poll()}")
        self.client = Client("127.0.0.1", self.port)

    def _up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def forwarded(self, path_prefix: str) -> int:
        """Requests nginx forwarded upstream whose URI starts with ``path_prefix``."""
        lines = (self.dir / "access.log").read_text().splitlines()
        return sum(1 for line in lines if line.startswith(path_prefix)
                   and line.rsplit(" ", 1)[1] != "-")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def test_behind_a_reverse_proxy_nothing_is_smuggled(site: Site, tmp_path: Path) -> None:
    """Every attack through nginx, with a request after it and a last one that closes: what
    we served is exactly what nginx forwarded, and a victim on another client connection
    (nginx reuses its connections to us) always gets its own answer."""
    nginx = Nginx(tmp_path / "nginx", site.port, site.pki)
    routes = ("status", "ping", "publish")
    before = {route: site.requests(route) for route in routes}
    try:
        attacks = [request for request, _, _ in REFUSED.values()] + [
            # bodies that look like requests, framed by Content-Length or chunked
            POST % b"px1" + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
            POST % b"px2" + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMUGGLED)
            + SMUGGLED + b"\r\n0\r\n\r\n",
        ]
        last = get("/pubapi/ping", "Connection: close")
        for attack in attacks:
            with nginx.client.connect() as sock:
                sock.sendall(attack + SMUGGLED + last)
                wait_closed(sock)  # nginx closes after an error or after the last one
            answer = nginx.client.exchange(get("/pubapi/config"))  # the victim
            assert (answer.status, answer.text) == (200, "repos:repo1.example.org\n"), \
                (attack, answer)
        # nginx logs a request once answered: wait for the last lines
        wait_for(lambda: nginx.forwarded("/pubapi/config") == len(attacks), 30)
        for route in routes:
            wait_for(lambda r=route: site.requests(r) - before[r]
                     == nginx.forwarded(f"/pubapi/{r}"), 30,
                     lambda r=route: f"{r}: we served {site.requests(r) - before[r]}, nginx "
                     f"forwarded {nginx.forwarded(f'/pubapi/{r}')}")
        assert nginx.forwarded("/pubapi/status") >= 2  # the pipelined ones after px1, px2
    finally:
        nginx.stop()
    site.clear()
