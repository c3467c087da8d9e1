"""HTTP(S) GETs of a stratum 0's files, as a stratum 1 makes them: streamed, hash-checked, retried.

One keep-alive connection per thread (the replica engine fetches with a few threads). Bodies go
to disk in blocks, so an object of any size costs a block of memory; the SHA-1 of what arrived
is compared with the name it was asked for, and a mismatch is fetched again with
``Cache-Control: no-cache`` (a proxy may hold a damaged copy). Redirects are not followed and
no content encoding is accepted: objects must arrive byte for byte as the origin stores them.
Every failure is a :class:`FetchError` whose text is one line naming the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from userpub import __version__
from userpub.errors import ServiceError

BLOCK = 1 << 20
LETTER_LIMIT = 64 << 20  # manifests, whitelists, status files, reflogs: never bigger than this
_NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache"}
_Sink = Callable[[bytes], None]
_Reset = Callable[[], None]


class FetchError(ServiceError):
    """A file could not be fetched (network, HTTP status, content); ``str()`` is one line."""


class NotFoundError(FetchError):
    """The origin answered 404 (or 410): the file does not exist there."""


class BadContentError(FetchError):
    """What arrived does not hash to the name it was fetched under."""


class Fetcher:
    """GETs below one base URL (``http://host:port/cvmfs/<fqrn>``)."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        parsed = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise FetchError(f"{base_url!r} is not an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port
        self._path = parsed.path
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._bytes = 0
        self._requests = 0

    # -- accounting -------------------------------------------------------------------------------
    @property
    def bytes_fetched(self) -> int:
        """Body bytes received so far (all threads)."""
        with self._lock:
            return self._bytes

    @property
    def requests(self) -> int:
        """GETs answered so far (all threads)."""
        with self._lock:
            return self._requests

    def _count(self, size: int) -> None:
        with self._lock:
            self._bytes += size
            self._requests += 1

    # -- connections --------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._scheme == "https":
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close every connection opened by any thread."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def url(self, name: str) -> str:
        """The full URL of ``name`` (relative to the base)."""
        return f"{self.base_url}/{name}"

    # -- requests -----------------------------------------------------------------------------------
    def get(self, name: str, *, fresh: bool = True, limit: int = LETTER_LIMIT) -> bytes:
        """The whole body of a small file (letters, status); ``fresh`` bypasses caches."""
        chunks: list[bytes] = []

        def sink(block: bytes) -> None:
            chunks.append(block)

        def reset() -> None:
            chunks.clear()

        self._request(name, sink, reset, fresh=fresh, limit=limit, sha1_hex=None)
        return b"".join(chunks)

    def download(self, name: str, dest: Path, *, sha1_hex: str | None) -> tuple[int, str]:
        """Stream ``name`` into a new file ``dest``; check its SHA-1 if given.

        Returns the size and the hex SHA-1 of what was stored.
        """
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            def sink(block: bytes) -> None:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]

            def reset() -> None:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)

            return self._request(name, sink, reset, fresh=False, limit=None, sha1_hex=sha1_hex)
        finally:
            os.close(fd)

    def _request(self, name: str, sink: _Sink, reset: _Reset, *, fresh: bool,
                 limit: int | None, sha1_hex: str | None) -> tuple[int, str]:
        url = self.url(name)
        last = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(4.0, self.backoff * 2 ** (attempt - 1)))
                reset()
            try:
                size, digest = self._once(name, sink, fresh=fresh or attempt > 0,
                                          limit=limit, sha1_hex=sha1_hex)
            except NotFoundError:
                raise
            except BadContentError as err:
                last = str(err)
                continue
            except FetchError:
                raise
            except (OSError, http.client.HTTPException) as err:
                self._drop_connection()
                last = f"{url}: {_describe(err)}"
                continue
            self._count(size)
            return size, digest
        raise FetchError(f"{last} (after {self.retries} attempts)")

    def _once(self, name: str, sink: _Sink, *, fresh: bool, limit: int | None,
              sha1_hex: str | None) -> tuple[int, str]:
        url = self.url(name)
        conn = self._connection()
        headers = {"User-Agent": f"userpub-replica/{__version__}", "Accept-Encoding": "identity"}
        if fresh:
            headers.update(_NO_CACHE)
        conn.request("GET", f"{self._path}/{name}", headers=headers)
        response = conn.getresponse()
        try:
            if response.status in (404, 410):
                raise NotFoundError(f"{url}: HTTP {response.status} (not on the origin)")
            if response.status >= 500:
                raise OSError(f"HTTP {response.status} {response.reason}")
            if response.status != 200:
                raise FetchError(f"{url}: HTTP {response.status} {response.reason}")
            encoding = response.getheader("Content-Encoding", "identity").lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"{url}: served with Content-Encoding {encoding}; objects "
                                 "must be sent as stored")
            digest = hashlib.sha1()  # noqa: S324 (the CVMFS content hash)
            size = 0
            while True:
                block = response.read(BLOCK)
                if not block:
                    break
                size += len(block)
                if limit is not None and size > limit:
                    raise FetchError(f"{url}: larger than {limit} bytes")
                digest.update(block)
                sink(block)
        except BaseException:
            response.close()
            self._drop_connection()
            raise
        if response.will_close:
            self._drop_connection()
        if sha1_hex is not None and digest.hexdigest() != sha1_hex:
            raise BadContentError(f"{url}: content hashes to {digest.hexdigest()}, not to its name")
        return size, digest.hexdigest()


def _describe(err: BaseException) -> str:
    """One line for a network error."""
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, http.client.IncompleteRead):
        return f"connection closed after {len(err.partial)} bytes of the body"
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())
