"""Raw HTTP/1.1 over real sockets, for tests that must send exactly the bytes they mean.

No client library: requests, urllib3 and curl normalise what they send (framing headers,
line endings, pipelining), which is precisely what the front-door and framing tests probe.

* :class:`Client` -- TLS (optionally with a client credential) or plain TCP connections to one
  address, from a chosen source address (127.0.0.0/8 is all loopback on Linux).
* :func:`read_answer` / :class:`Answer` -- one response, parsed strictly enough for asserts.
* :func:`is_closed` -- whether the server has closed a connection (EOF pending), without
  waiting.
* :func:`ensure_open_files` -- raise this process's RLIMIT_NOFILE for many connections.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HANG_GUARD = 60.0  # seconds: only ever reached when something hangs


@dataclass
class Answer:
    """One HTTP response: status code, headers (lower-case names), body."""

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Closed(Exception):
    """The connection ended before a whole answer arrived."""


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (ssl.SSLEOFError, ConnectionResetError):
        return b""


def read_answer(sock: socket.socket, pending: bytearray | None = None) -> Answer:
    """Read one response from ``sock`` (``pending``: bytes already received, consumed and
    refilled with what follows the answer). Raises :class:`Closed` at a premature EOF."""
    data = pending if pending is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock)
        if not chunk:
            raise Closed(bytes(data))
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        chunk = _recv(sock)
        if not chunk:
            raise Closed(head + b"\r\n\r\n" + bytes(body))
        body += chunk
    data[:] = body[length:]
    return Answer(int(status), reason, headers, bytes(body[:length]))


def is_closed(sock: socket.socket) -> bool:
    """True if the peer closed ``sock`` (readable with nothing to read, or reset)."""
    poller = select.poll()  # not select(): descriptors past 1024 are common with 1,000 clients
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def wait_closed(sock: socket.socket, timeout: float = HANG_GUARD) -> bytes:
    """Everything the server still sends until it closes ``sock``; AssertionError on a hang."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection; got {out[:200]!r}"
                             ) from None
    except (ssl.SSLError, ConnectionResetError):
        pass
    return out


def ensure_open_files(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (skip the test if the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Client:
    """Connections to ``host:port``; ``tls`` with the CA file ``ca`` and an optional client
    credential (a PEM holding certificate, key and chain, as a proxy file does)."""

    def __init__(self, host: str, port: int, *, ca: Path | None = None,
                 credential: Path | None = None) -> None:
        self.host, self.port = host, port
        self.context: ssl.SSLContext | None = None
        if ca is not None:
            self.context = ssl.create_default_context(cafile=str(ca))
            if credential is not None:
                self.context.load_cert_chain(str(credential))

    def tcp(self, source: str = "127.0.0.1", timeout: float = HANG_GUARD) -> socket.socket:
        """A TCP connection that has sent nothing."""
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(source, 0))

    def connect(self, source: str = "127.0.0.1", timeout: float = HANG_GUARD
                ) -> socket.socket:
        """A connection ready for HTTP (TLS handshake done when TLS)."""
        sock = self.tcp(source, timeout)
        if self.context is None:
            return sock
        try:
            return self.context.wrap_socket(sock, server_hostname="localhost")
        except BaseException:
            sock.close()
            raise

    def exchange(self, request: bytes, source: str = "127.0.0.1") -> Answer:
        """Send ``request`` on a new connection and read one answer."""
        with self.connect(source) as sock:
            sock.sendall(request)
            return read_answer(sock)


def get(path: str, *extra: str, version: str = "HTTP/1.1") -> bytes:
    """A GET request's bytes."""
    lines = [f"GET {path} {version}", "Host: localhost", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.contextmanager
def many(sockets: list[socket.socket]):
    """Close every socket of ``sockets`` (filled inside the block) on exit."""
    try:
        yield sockets
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
