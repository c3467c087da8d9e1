"""cheroot connection and request classes with the behaviour an upload service needs.

* The TLS handshake runs in the worker thread (``GridConnection.communicate``), not in
  cheroot's single accept loop, so a client that connects and stays silent cannot stall
  everybody else for ``socket_timeout`` seconds.
* ``Expect: 100-continue`` is answered only when the application starts reading the body, so
  a request refused before that (403, 400, 413, 507) costs the client no upload.
* Request bodies are received into the caller's buffer (``readinto``), bypassing cheroot's
  pure-Python buffered reader; chunked bodies are de-chunked in bounded pieces (cheroot's
  reader holds a whole chunk in memory, however large the client made it); bodies left unread
  are drained 1 MiB at a time (cheroot reads them in one allocation) -- or the connection is
  closed, when the client has not sent them or they are chunked.
* A request must arrive at a minimum pace (:class:`Pace`): its line, headers and body
  within ``socket_timeout`` plus one second per ``MIN_RATE`` bytes. The socket timeout
  alone bounds each receive, so a client trickling a byte at a time could hold a worker
  thread for ever.
* Paths are taken as Apache serves them: runs of ``/`` in the request-target's path are merged
  before cheroot parses it (``GET //pubapi/exists`` -- every justIN call -- would otherwise be
  taken for an absolute URI and refused before the application sees it); see
  :func:`merge_slashes`.
* A connection closed while the client is still sending its body lingers: what arrives is
  read and discarded for up to ``LINGER_SECONDS``, so that clients which send the whole body
  before reading (python-requests) see the 413 or 403 instead of a connection reset.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from cheroot import server as cheroot_server
from cheroot.makefile import MakeFile

__all__ = ["BodyReader", "ChunkedReader", "GridConnection", "GridRequest", "Pace",
           "SocketSource", "connection_class", "merge_slashes"]

log = logging.getLogger("userpub.ingest")

DRAIN_CHUNK = 1 << 20
MAX_LINE = 4096
MAX_TRAILERS = 64
LINGER_SECONDS = 10.0
TOO_LARGE = "Request Entity Too Large"
MIN_RATE = 1000  # bytes/s a request must average once its first socket_timeout has passed


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

    A request (line, headers, body) must arrive within the socket's timeout plus one second
    per ``MIN_RATE`` bytes received: a read past that deadline raises TimeoutError, and one
    near it waits only until it. :meth:`start` begins a request's clock; :meth:`wrap` makes
    a paced version of a ``recv_into``-like function.
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.timeout: float | None = sock.gettimeout()
        self.deadline = 0.0
        self.start()

    def start(self) -> None:
        """A new request begins."""
        self.deadline = time.monotonic() + (self.timeout or float("inf"))

    def wrap(self, recv_into: Callable[..., int]) -> Callable[..., int]:
        """``recv_into`` within the request's deadline."""

        def paced(buffer: Any, *args: Any) -> int:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request arrives too slowly")
            near = self.timeout is not None and left < self.timeout
            if near:
                self.sock.settimeout(left)
            try:
                received = int(recv_into(buffer, *args))
            finally:
                if near:
                    self.sock.settimeout(self.timeout)
            self.deadline += received / MIN_RATE
            return received

        return paced


class _PacedSocket:
    """A socket whose ``recv_into`` is paced (for cheroot's buffered reader)."""

    def __init__(self, sock: Any, pace: Pace) -> None:
        self._sock = sock
        self.recv_into = pace.wrap(sock.recv_into)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Source(Protocol):
    """Where request bodies come from: lines and small reads buffered, bulk data direct."""

    def readline(self, limit: int) -> bytes: ...
    def read(self, size: int) -> bytes: ...
    def readinto(self, view: memoryview) -> int: ...


class SocketSource:
    """The connection's stream: cheroot's buffered reader for lines and small reads, and
    ``recv_into`` on the socket for bulk data once that buffer is empty.

    cheroot's reader is the pure-Python ``_pyio.BufferedReader``, which allocates a buffer
    of the requested size for every TLS record it reads; receiving straight into the
    caller's buffer is several times cheaper. ``on_first_read`` runs before the first read
    (it sends ``100 Continue``).
    """

    def __init__(self, rfile: Any, sock: Any, on_first_read: Callable[[], None] | None = None,
                 pace: Pace | None = None) -> None:
        self.rfile = rfile
        self.sock = sock
        self.on_first_read = on_first_read
        # SSLSocket.recv_into is three Python calls around _sslobj.read(n, buffer), once per
        # 16 KiB TLS record; call it directly where it exists (CPython 3.7 and later).
        sslobj = getattr(sock, "_sslobj", None)
        self._recv_into: Callable[[memoryview], int] = (
            (lambda view: int(sslobj.read(len(view), view))) if sslobj is not None
            else sock.recv_into)
        if pace is not None:
            self._recv_into = pace.wrap(self._recv_into)

    def _start(self) -> None:
        if self.on_first_read is not None:
            callback, self.on_first_read = self.on_first_read, None
            callback()

    def readline(self, limit: int) -> bytes:
        """A line (at most ``limit`` bytes), through cheroot's buffer."""
        self._start()
        line: bytes = self.rfile.readline(limit)
        return line

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes through cheroot's buffer (for small reads)."""
        self._start()
        data: bytes = self.rfile.read(size)
        return data

    def readinto(self, view: memoryview) -> int:
        """Receive some bytes into ``view``: what cheroot buffered first, then the socket."""
        self._start()
        if self.rfile.has_data():
            data = self.rfile.read(min(len(view), len(self.rfile.peek(1))))
            view[:len(data)] = data
            return len(data)
        return self._recv_into(view)


def _fill(read_some: Callable[[memoryview], int], view: memoryview) -> int:
    """Call ``read_some`` until ``view`` is full or it returns 0; the bytes read."""
    got = 0
    while got < len(view):
        n = read_some(view[got:])
        if n == 0:
            break
        got += n
    return got


class BodyReader:
    """A body of known length (Content-Length); b'' once it is read or the peer is gone."""

    def __init__(self, source: Source, length: int) -> None:
        self.source = source
        self.remaining = length

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` as far as the body goes (fewer bytes only at its end or at EOF)."""
        want = min(len(view), self.remaining)
        if want <= 0:
            return 0
        got = _fill(self.source.readinto, view[:want])
        self.remaining -= got
        return got

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` is None or negative)."""
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        buffer = bytearray(want)
        return bytes(buffer[:self.readinto(memoryview(buffer))])

    def readline(self, size: int | None = -1) -> bytes:
        """A line of the body (the API never reads bodies by line)."""
        if self.remaining <= 0:
            return b""
        limit = self.remaining if size is None or size < 0 else min(size, self.remaining)
        line = self.source.readline(limit)
        self.remaining -= len(line)
        return line


class ChunkedReader:
    """De-chunks a request body; never holds more than the caller's buffer."""

    def __init__(self, source: Source, maxlen: int) -> None:
        self.source = source
        self.maxlen = maxlen
        self.left = 0  # bytes left in the current chunk
        self.total = 0
        self.done = False

    @property
    def closed(self) -> bool:
        """True once the last chunk (and the trailers) were read."""
        return self.done

    def _line(self) -> bytes:
        line = self.source.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ValueError("truncated chunked body" if len(line) < MAX_LINE
                             else "chunk header line too long")
        return line

    def _next_chunk(self) -> None:
        size_text = self._line().split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ValueError(f"bad chunk size {size_text[:20]!r}") from None
        if size < 0:
            raise ValueError("negative chunk size")
        if size == 0:
            for _ in range(MAX_TRAILERS):
                if self._line() in (b"\r\n", b"\n"):
                    self.done = True
                    return
            raise ValueError("too many trailer lines")
        self.left = size

    def _read_some(self, view: memoryview) -> int:
        if self.done:
            return 0
        if self.left == 0:
            self._next_chunk()
            if self.done:
                return 0
        n = self.source.readinto(view[:min(len(view), self.left)])
        if n == 0:
            raise ValueError("truncated chunked body")
        self.left -= n
        self.total += n
        if self.maxlen and self.total > self.maxlen:
            raise OSError(TOO_LARGE)
        if self.left == 0 and self.source.read(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        return n

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with body bytes (fewer only at the end); ValueError/OSError if bad."""
        return _fill(self._read_some, view)

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` body bytes (b'' at the end)."""
        if size is None or size < 0:
            parts = []
            while part := self.read(DRAIN_CHUNK):
                parts.append(part)
            return b"".join(parts)
        buffer = bytearray(size)
        return bytes(buffer[:self.readinto(memoryview(buffer))])

    def readline(self, size: int | None = -1) -> bytes:
        """A line of the body (slow; the API never reads bodies by line)."""
        out = bytearray()
        while size is None or size < 0 or len(out) < size:
            byte = self.read(1)
            out += byte
            if not byte or byte == b"\n":
                break
        return bytes(out)


class GridRequest(cheroot_server.HTTPRequest):
    """HTTPRequest with lazy 100-continue, a bounded chunked reader and bounded draining."""

    expect_continue = False
    continue_sent = False
    body_limit = 0  # bytes; 0 = unlimited (set per server by connection_class)

    def read_request_headers(self) -> bool:
        """Read headers; take ``Expect: 100-continue`` away from cheroot (answered lazily)."""
        reader = self.header_reader

        def read_headers(rfile: Any, hdict: dict[bytes, bytes]) -> dict[bytes, bytes]:
            out: dict[bytes, bytes] = reader(rfile, hdict)
            if out.get(b"Expect", b"").strip().lower() == b"100-continue":
                del out[b"Expect"]
                self.expect_continue = True
            return out

        self.header_reader = read_headers
        try:
            ok: bool = super().read_request_headers()  # type: ignore[no-untyped-call]
        finally:
            del self.header_reader
        return ok

    def read_request_line(self) -> bool:
        """cheroot's parsing of the request line, with runs of ``/`` merged first."""
        reader = self.rfile
        self.rfile = _FirstLine(reader)
        try:
            ok: bool = super().read_request_line()  # type: ignore[no-untyped-call]
        finally:
            self.rfile = reader
        return ok

    def send_continue(self) -> None:
        """Tell a waiting client to send its body (once)."""
        if self.expect_continue and not self.continue_sent:
            self.continue_sent = True
            # A broken connection is reported by the read that follows.
            with contextlib.suppress(OSError):
                self.conn.wfile.write(f"{self.server.protocol} 100 Continue\r\n\r\n".encode())

    def respond(self) -> None:
        """cheroot's respond(), with our readers for the body."""
        source = SocketSource(self.conn.rfile, self.conn.socket,
                              self.send_continue if self.expect_continue else None,
                              getattr(self.conn, "pace", None))
        if self.chunked_read:
            self.rfile = ChunkedReader(source, self.body_limit)
        else:
            self.rfile = BodyReader(source, int(self.inheaders.get(b"Content-Length", 0)))
        self.server.gateway(self).respond()
        if self.ready:
            self.ensure_headers_sent()
        if self.chunked_write:
            self.conn.wfile.write(b"0\r\n\r\n")

    def send_headers(self) -> None:
        """Close rather than read a body never sent (or chunked); drain others piecewise."""
        for key, value in self.outheaders:
            if key.lower() == b"connection" and value.strip().lower() == b"close":
                self.close_connection = True
        if self.expect_continue and not self.continue_sent:
            self.close_connection = True
        if self.chunked_read and not getattr(self.rfile, "done", True):
            self.close_connection = True
        rfile = self.rfile
        if self.body_limit and getattr(rfile, "remaining", 0) > self.body_limit:
            self.close_connection = True
        if not self.close_connection and not self.chunked_read:
            try:
                while getattr(rfile, "remaining", 0) > 0:
                    if not rfile.read(min(rfile.remaining, DRAIN_CHUNK)):
                        self.close_connection = True
                        break
            except OSError:  # the client went away or stalled: answer, then close
                self.close_connection = True
        client_sending = not (self.expect_continue and not self.continue_sent)
        unread = getattr(rfile, "remaining", 0) > 0 or not getattr(rfile, "done", True)
        if self.close_connection and client_sending and unread:
            self.conn.linger_on_close = True
        super().send_headers()


def handshake_problem(err: OSError) -> tuple[str, bool]:
    """(one-line reason of a failed handshake, whether the client certificate was refused)."""
    verify = getattr(err, "verify_message", None)
    reason = getattr(err, "reason", None) or err.strerror or str(err) or type(err).__name__
    text = f"{reason}: {verify}" if verify else str(reason)
    return text, bool(verify) or "CERTIFICATE" in text.upper()


class GridConnection(cheroot_server.HTTPConnection):
    """An HTTP connection whose TLS handshake happens here, in a worker thread."""

    RequestHandlerClass = GridRequest
    handshaken = False
    linger_on_close = False
    on_handshake_failure: Callable[[str, str, bool], None] | None = None

    def __init__(self, server: Any, sock: Any, makefile: Any = MakeFile) -> None:
        self.pace = Pace(sock)

        def paced_makefile(s: Any, mode: str = "r", bufsize: int = -1) -> Any:
            return makefile(_PacedSocket(s, self.pace) if "r" in mode else s, mode, bufsize)

        super().__init__(server, sock, paced_makefile)

    def communicate(self) -> bool:
        """Handshake (first time only), then serve one request; False closes."""
        if not self.handshaken and isinstance(self.socket, ssl.SSLSocket):
            try:
                self.socket.do_handshake()
                self.ssl_env = self.server.ssl_adapter.get_environ(self.socket)
            except OSError as err:
                reason, bad_cert = handshake_problem(err)
                log.info("%s TLS handshake failed: %s", self.remote_addr, reason)
                if self.on_handshake_failure is not None:
                    self.on_handshake_failure(str(self.remote_addr), reason, bad_cert)
                return False
            self.handshaken = True
        self.pace.start()
        keep: bool = super().communicate()  # type: ignore[no-untyped-call]
        return keep

    def close(self) -> None:
        """Close; after an early answer, first discard what the client still sends."""
        if self.linger_on_close:
            self.linger_on_close = False
            deadline = time.monotonic() + LINGER_SECONDS
            sink = memoryview(bytearray(1 << 16))
            try:
                while (left := deadline - time.monotonic()) > 0:
                    self.socket.settimeout(left)
                    if not self.socket.recv_into(sink):
                        break
            except OSError:
                pass  # reset, timeout, TLS EOF: the client is gone or too slow
        super().close()


def connection_class(on_handshake_failure: Callable[[str, str, bool], None] | None,
                     body_limit: int) -> type[GridConnection]:
    """A GridConnection subclass for one server.

    Failed handshakes are reported to ``on_handshake_failure``; chunked bodies over
    ``body_limit`` bytes fail with ``OSError("Request Entity Too Large")``, and unread bodies
    over it are not drained (the connection is closed). Content-Length is for the app to check.
    """
    request = type("IngestRequest", (GridRequest,), {"body_limit": body_limit})
    attributes: dict[str, Any] = {"RequestHandlerClass": request}
    if on_handshake_failure is not None:
        attributes["on_handshake_failure"] = staticmethod(on_handshake_failure)
    return type("IngestConnection", (GridConnection,), attributes)
