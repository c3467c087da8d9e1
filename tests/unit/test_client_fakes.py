"""Scripted /pubapi servers (real http.server over real TLS) for the client tests.

A :class:`FakeServer` answers every request with ``responder(seen)`` and records what it saw:
method, path, query, headers, the body's length and hash, and the client certificate.
:func:`make_pki` builds a development CA, a host certificate and a user proxy with
``devsite.pki``. Only a sanity test lives here; the other test modules import these.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devsite.pki import CertificateAuthority, make_proxy

USER_DN = "/DC=org/DC=example/OU=People/CN=Jane Doe 12345"


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    endpoint: str
    query: dict[str, str]
    headers: dict[str, str]
    body_length: int = 0
    body_sha256: str = ""
    peer_subject: str | None = None


@dataclass
class Reply:
    """What to answer: status, body, extra headers."""

    status: int = 200
    body: str = "OK\n"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pki:
    """Files of a development PKI."""

    ca_file: Path
    ca_dir: Path
    host_cert: Path
    host_key: Path
    proxy: Path


def make_pki(directory: Path) -> Pki:
    """A CA (file and grid-layout directory), a host cert for 127.0.0.1, a user proxy."""
    ca = CertificateAuthority()
    ca_dir = directory / "certificates"
    ca.install(ca_dir)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.pem())
    host_cert, host_key = ca.issue_host(["localhost", "127.0.0.1"]).write_pair(
        directory / "hostcert.pem", directory / "hostkey.pem")
    proxy = make_proxy(ca.issue_user(USER_DN)).write(directory / "proxy.pem")
    return Pki(ca_file, ca_dir, host_cert, host_key, proxy)


def server_context(pki: Pki) -> ssl.SSLContext:
    """Server side: host cert; client certs optional, RFC 3820 proxies allowed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.host_cert, pki.host_key)
    ctx.load_verify_locations(capath=str(pki.ca_dir))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    return ctx


class FakeServer:
    """A threaded HTTP(S) server on 127.0.0.1 answering with ``responder``."""

    def __init__(self, responder: Callable[[Seen], Reply],
                 tls: ssl.SSLContext | None = None) -> None:
        self.responder = responder
        self.requests: list[Seen] = []
        self.early: Reply | None = None  # answer Expect: 100-continue with this instead
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                seen = Seen(self.command, url.path,
                            dict(urllib.parse.parse_qsl(url.query)), dict(self.headers.items()))
                if isinstance(self.connection, ssl.SSLSocket):
                    cert = self.connection.getpeercert()
                    if cert:
                        seen.peer_subject = "".join(
                            f"/{k}={v}" for rdn in cert["subject"] for k, v in rdn)
                length = int(self.headers.get("Content-Length") or 0)
                digest = hashlib.sha256()
                while length > seen.body_length:
                    chunk = self.rfile.read(min(1 << 16, length - seen.body_length))
                    if not chunk:
                        break
                    seen.body_length += len(chunk)
                    digest.update(chunk)
                seen.body_sha256 = digest.hexdigest()
                owner.requests.append(seen)
                reply = owner.responder(seen)
                data = reply.body.encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def handle_expect_100(self) -> bool:
                if owner.early is None:
                    return super().handle_expect_100()
                data = owner.early.body.encode()
                self.send_response(owner.early.status)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True
                return False

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True,
                                                do_handshake_on_connect=False)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def url(self) -> str:
        """``scheme://127.0.0.1:port``."""
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def endpoints(self) -> list[str]:
        """The endpoints requested so far, in order (``exists``, ``publish``...)."""
        return [s.endpoint.rsplit("/", 1)[-1] for s in self.requests]

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def refusing_url() -> str:
    """An http(s) address on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


def scripted(*replies: Reply) -> Callable[[Seen], Reply]:
    """Answer with ``replies`` in turn, repeating the last one."""
    queue = list(replies)

    def respond(_seen: Seen) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]
    return respond


@pytest.mark.timeout(30)
def test_fake_server_answers_over_tls(tmp_path):
    pki = make_pki(tmp_path)
    client = ssl.create_default_context(cafile=str(pki.ca_file))
    client.load_cert_chain(str(pki.proxy))
    with FakeServer(scripted(Reply(body="PRESENT:/x\n")), server_context(pki)) as srv:
        import http.client

        conn = http.client.HTTPSConnection("127.0.0.1", srv.httpd.server_address[1],
                                           context=client, timeout=10)
        conn.request("GET", "/pubapi/exists?cid=a%2Fb")
        assert conn.getresponse().read() == b"PRESENT:/x\n"
        conn.close()
    assert srv.requests[0].query == {"cid": "a/b"}
    assert srv.requests[0].peer_subject.startswith(
        "/domainComponent=org/domainComponent=example/organizationalUnitName=People/"
        "commonName=Jane Doe 12345/commonName=")
