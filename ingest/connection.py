"""cheroot connection and request classes with the behaviour an upload service needs.

A connection reaches a worker thread only with a complete request head in its buffer (the
front stage, :mod:`ingest.frontstage`, does the TLS handshake and reads heads without
blocking); between requests, and to linger or discard an unread body, it goes back there.

* The head is parsed by cheroot, with strict framing (:mod:`ingest.framing`): two
  Content-Length headers, Content-Length with Transfer-Encoding, lax numbers, HTTP/1.0 with
  chunked, obsolete folding ... are answered 400 and the connection is closed.
* Paths are taken as Apache serves them: runs of ``/`` in the request-target's path are merged
  before cheroot parses it (``GET //pubapi/exists`` -- every justIN call -- would otherwise be
  taken for an absolute URI and refused before the application sees it); see
  :func:`merge_slashes`.
* ``Expect: 100-continue`` is answered only when the application starts reading the body, so
  a request refused before that (403, 400, 413, 507) costs the client no upload.
* Request bodies are received into the caller's buffer (``readinto``), bypassing any
  intermediate buffer; chunked bodies are de-chunked in bounded pieces.
* A body must arrive at a minimum pace (:class:`Pace`): within ``socket_timeout`` plus one
  second per ``MIN_RATE`` bytes. The socket timeout alone bounds each receive, so a client
  trickling a byte at a time could hold a worker thread for ever.
* A body left unread after an early answer is discarded by the front stage before the next
  request (the connection stays open), unless it is chunked or larger than the body limit
  or ``DISCARD_LIMIT``: then the connection is closed, after lingering (our side shut, what
  arrives discarded for up to ``LINGER_SECONDS``) so that clients which send the whole body
  before reading (python-requests) see the 413 or 403 instead of a connection reset.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from cheroot import server as cheroot_server
from cheroot.makefile import MakeFile

from ingest.framing import (
    TOO_LARGE,
    BodyReader,
    ChunkedReader,
    FramingError,
    UnsupportedCodingError,
    decide_framing,
    fold_fields,
    read_fields,
)

__all__ = ["TOO_LARGE", "BodyReader", "ChunkedReader", "ConnectionReader", "FrontDoor",
           "GridConnection", "GridRequest", "Pace", "SocketSource", "connection_class",
           "merge_slashes"]

RECEIVE_SIZE = 1 << 16
DISCARD_LIMIT = 64 << 20  # an unread body larger than this closes the connection
MIN_RATE = 1000  # bytes/s a body must average once its first socket_timeout has passed
LINGER_SECONDS = 10.0
_SLASHES = re.compile(rb"/{2,}")


def merge_slashes(request_line: bytes) -> bytes:
    """The request line with runs of ``/`` merged in its target's path (not in its query),
    as Apache's MergeSlashes does; anything that is not ``METHOD /path... VERSION`` is
    returned unchanged (cheroot judges it)."""
    parts = request_line.split(b" ", 2)
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return request_line
    path, mark, query = parts[1].partition(b"?")
    return b" ".join((parts[0], _SLASHES.sub(b"/", path) + mark + query, parts[2]))


class _FirstLine:
    """A reader whose next ``readline`` passes through :func:`merge_slashes`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def readline(self, *args: Any) -> bytes:
        line: bytes = self.inner.readline(*args)
        return merge_slashes(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Pace:
    """A deadline per request on one connection's reads.

    A body must arrive within ``timeout`` plus one second per ``MIN_RATE`` bytes received:
    a read past that deadline raises TimeoutError, and one near it waits only until it.
    :meth:`start` begins a request's clock; :meth:`wrap` makes a paced version of a
    ``recv_into``-like function.
    """

    def __init__(self, sock: Any, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = 0.0
        self.start()

    def start(self) -> None:
        """A new request begins."""
        self.deadline = time.monotonic() + self.timeout

    def wrap(self, recv_into: Callable[[memoryview], int]) -> Callable[[memoryview], int]:
        """``recv_into`` within the request's deadline."""

        def paced(buffer: memoryview) -> int:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request arrives too slowly")
            near = left < self.timeout
            if near:
                self.sock.settimeout(left)
            try:
                received = int(recv_into(buffer))
            finally:
                if near:
                    self.sock.settimeout(self.timeout)
            self.deadline += received / MIN_RATE
            return received

        return paced


def raw_receiver(sock: Any) -> Callable[[memoryview], int]:
    """The fastest ``recv_into`` of ``sock``.

    SSLSocket.recv_into is three Python calls around _sslobj.read(n, buffer), once per
    16 KiB TLS record; call it directly where it exists (CPython 3.7 and later).
    """
    sslobj = getattr(sock, "_sslobj", None)
    if sslobj is not None:
        return lambda view: int(sslobj.read(len(view), view))
    return lambda view: int(sock.recv_into(view))


class ConnectionReader:
    """Every byte received on one connection, in order.

    The front stage appends what it receives without blocking (:meth:`feed`); in a worker,
    reads take the buffered bytes first and then receive from the socket through
    ``receive`` (blocking, paced). Lines and small reads go through the buffer; bulk reads
    (:meth:`readinto`) go straight into the caller's buffer once it is empty.
    """

    def __init__(self, receive: Callable[[memoryview], int]) -> None:
        self.buffer = bytearray()
        self.receive = receive
        self.closed = False
        self.bytes_read = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes received by the front stage."""
        self.buffer += data

    def has_data(self) -> bool:
        """True when bytes are buffered."""
        return bool(self.buffer)

    def take(self, size: int) -> bytes:
        """Remove and return up to ``size`` buffered bytes."""
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.bytes_read += len(data)
        return data

    def _more(self) -> bool:
        """Receive more bytes into the buffer (blocking); False at end of stream."""
        scratch = bytearray(RECEIVE_SIZE)
        n = self.receive(memoryview(scratch))
        self.buffer += memoryview(scratch)[:n]
        return n > 0

    def readline(self, size: int | None = -1) -> bytes:
        """A line (up to ``size`` bytes), shorter only at end of stream."""
        start = 0
        while True:
            end = len(self.buffer) if size is None or size < 0 else min(size, len(self.buffer))
            found = self.buffer.find(b"\n", start, end)
            if found >= 0:
                return self.take(found + 1)
            if size is not None and 0 <= size <= len(self.buffer):
                return self.take(size)
            start = len(self.buffer)
            if not self._more():
                return self.take(len(self.buffer))

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes (everything up to end of stream if negative), fewer only at its end."""
        while (size is None or size < 0 or len(self.buffer) < size) and self._more():
            pass
        return self.take(len(self.buffer) if size is None or size < 0 else size)

    def readinto(self, view: memoryview) -> int:
        """Some bytes into ``view``: buffered ones first, else straight from the socket."""
        if self.buffer:
            n = min(len(view), len(self.buffer))
            view[:n] = self.buffer[:n]
            del self.buffer[:n]
        else:
            n = self.receive(view)
        self.bytes_read += n
        return n

    def close(self) -> None:
        """Forget the buffer."""
        self.closed = True
        self.buffer = bytearray()


class SocketSource:
    """The request body's view of the connection: ``on_first_read`` (it sends
    ``100 Continue``) runs before the first read."""

    def __init__(self, reader: ConnectionReader,
                 on_first_read: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self.on_first_read = on_first_read

    def _start(self) -> None:
        if self.on_first_read is not None:
            callback, self.on_first_read = self.on_first_read, None
            callback()

    def readline(self, limit: int) -> bytes:
        """A line (at most ``limit`` bytes)."""
        self._start()
        return self.reader.readline(limit)

    def read(self, size: int) -> bytes:
        """``size`` bytes (fewer only at end of stream)."""
        self._start()
        return self.reader.read(size)

    def readinto(self, view: memoryview) -> int:
        """Receive some bytes into ``view``."""
        self._start()
        return self.reader.readinto(view)


class GridRequest(cheroot_server.HTTPRequest):
    """HTTPRequest with strict framing, lazy 100-continue and bounded body handling."""

    expect_continue = False
    continue_sent = False
    content_length = 0
    body_limit = 0  # bytes; 0 = unlimited (set per server by connection_class)

    def parse_request(self) -> None:
        """cheroot's parsing; a refused head closes the connection after lingering."""
        super().parse_request()
        if not self.ready and self.started_request:
            self.conn.linger_on_close = True

    def read_request_line(self) -> bool:
        """cheroot's parsing of the request line, with runs of ``/`` merged first."""
        reader = self.rfile
        self.rfile = _FirstLine(reader)
        try:
            ok: bool = super().read_request_line()  # type: ignore[no-untyped-call]
        finally:
            self.rfile = reader
        return ok

    def read_request_headers(self) -> bool:
        """Read the header fields strictly and decide the body's framing."""
        try:
            fields = read_fields(self.rfile.readline)
            framing = decide_framing(fields, self.response_protocol == "HTTP/1.1")
        except UnsupportedCodingError as err:
            self.simple_response("501 Not Implemented", f"{err}\n")
            return False
        except FramingError as err:
            self.simple_response("400 Bad Request", f"{err}\n")
            return False
        headers = fold_fields(fields)
        if framing.length is not None and b"Content-Length" in headers:
            headers[b"Content-Length"] = b"%d" % framing.length  # no leading zeros
        self.inheaders = headers
        self.chunked_read = framing.chunked
        self.content_length = framing.length or 0
        tokens = {t.strip(b" \t").lower() for t in headers.get(b"Connection", b"").split(b",")}
        if self.response_protocol == "HTTP/1.1":
            self.close_connection = b"close" in tokens
        else:
            self.close_connection = b"keep-alive" not in tokens
        if headers.get(b"Expect", b"").strip().lower() == b"100-continue":
            del headers[b"Expect"]  # answered when the application first reads the body
            self.expect_continue = True
        return True

    def simple_response(self, status: str, msg: str = "") -> None:
        """cheroot's error answer, always followed by a close: say so."""
        self.close_connection = True
        if not status.startswith(("413", "414")):  # cheroot adds it to those itself
            self.outheaders = []
            msg_bytes = msg.encode("ISO-8859-1") if isinstance(msg, str) else msg
            head = (f"{self.server.protocol} {status}\r\nContent-Length: {len(msg_bytes)}\r\n"
                    "Content-Type: text/plain\r\nConnection: close\r\n\r\n")
            with contextlib.suppress(OSError):
                self.conn.wfile.write(head.encode("ISO-8859-1") + msg_bytes)
            return
        super().simple_response(status, msg)

    def send_continue(self) -> None:
        """Tell a waiting client to send its body (once)."""
        if self.expect_continue and not self.continue_sent:
            self.continue_sent = True
            # A broken connection is reported by the read that follows.
            with contextlib.suppress(OSError):
                self.conn.wfile.write(f"{self.server.protocol} 100 Continue\r\n\r\n".encode())

    def respond(self) -> None:
        """cheroot's respond(), with our readers for the body."""
        source = SocketSource(self.conn.rfile,
                              self.send_continue if self.expect_continue else None)
        if self.chunked_read:
            self.rfile = ChunkedReader(source, self.body_limit)
        else:
            self.rfile = BodyReader(source, self.content_length)
        self.server.gateway(self).respond()
        if self.ready:
            self.ensure_headers_sent()
        if self.chunked_write:
            self.conn.wfile.write(b"0\r\n\r\n")

    def send_headers(self) -> None:
        """Leave an unread body to the front stage (discarded, or lingered on close)."""
        for key, value in self.outheaders:
            if key.lower() == b"connection" and value.strip().lower() == b"close":
                self.close_connection = True
        waiting = self.expect_continue and not self.continue_sent  # the body was never sent
        if waiting:
            self.close_connection = True
        rfile = self.rfile
        if self.chunked_read and not getattr(rfile, "done", True):
            self.close_connection = True
        remaining = 0 if waiting else getattr(rfile, "remaining", 0)
        if remaining > min(self.body_limit or DISCARD_LIMIT, DISCARD_LIMIT):
            self.close_connection = True
        if remaining > 0:  # cheroot would read it here, in one allocation: not in a worker
            self.conn.discard = remaining
            rfile.remaining = 0
        unread = remaining > 0 or not getattr(rfile, "done", True)
        if self.close_connection and not waiting and unread:
            self.conn.linger_on_close = True
        super().send_headers()


class FrontDoor(Protocol):
    """What a connection asks of the front stage that owns it."""

    def linger(self, conn: GridConnection) -> bool:
        """Take ``conn`` over to linger and close it; False if it must close at once."""

    def release(self, conn: GridConnection) -> None:
        """``conn`` is closed: it no longer counts."""


class GridConnection(cheroot_server.HTTPConnection):
    """An HTTP connection that reads through a :class:`ConnectionReader`.

    ``discard`` is the number of body bytes the front stage must drop before the next
    request; ``linger_on_close`` asks for a lingering close.
    """

    RequestHandlerClass = GridRequest
    linger_on_close = False
    front: FrontDoor | None = None

    def __init__(self, server: Any, sock: Any, makefile: Any = MakeFile) -> None:
        timeout = float(server.timeout)
        self.pace = Pace(sock, timeout)

        def writer_only(s: Any, mode: str = "r", bufsize: int = -1) -> Any:
            return makefile(s, mode, bufsize) if "w" in mode else None

        super().__init__(server, sock, writer_only)
        self.rfile: ConnectionReader = ConnectionReader(self.pace.wrap(raw_receiver(sock)))
        self.discard = 0
        self.is_closed = False
        self.slot: Any = None  # the front stage's record of this connection

    def communicate(self) -> bool:
        """Serve one request (its head is buffered); False closes."""
        if self.ssl_env is None and isinstance(self.socket, ssl.SSLSocket):
            self.ssl_env = self.server.ssl_adapter.get_environ(self.socket)
        self.linger_on_close = False
        self.pace.start()
        keep: bool = super().communicate()  # type: ignore[no-untyped-call]
        return keep

    def close(self) -> None:
        """Close; with a body or bytes still to come, let the front stage linger first."""
        lingering = self.linger_on_close or self.discard > 0 or self.rfile.has_data()
        if lingering and not self.is_closed and self.front is not None \
                and self.front.linger(self):
            return
        self.close_now()

    def close_now(self) -> None:
        """Close the socket at once (idempotent)."""
        if self.is_closed:
            return
        self.is_closed = True
        with contextlib.suppress(OSError):
            super().close()
        if self.front is not None:
            self.front.release(self)


def connection_class(body_limit: int) -> type[GridConnection]:
    """A GridConnection subclass for one server.

    Chunked bodies over ``body_limit`` bytes fail with ``OSError("Request Entity Too
    Large")``, and unread bodies over it are not discarded (the connection is closed).
    Content-Length is for the app to check.
    """
    request = type("IngestRequest", (GridRequest,), {"body_limit": body_limit})
    return type("IngestConnection", (GridConnection,), {"RequestHandlerClass": request})
