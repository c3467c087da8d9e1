"""Receiving a request body into the spool: bounded memory, two cores, clear answers.

:func:`receive` reads the body 1 MiB at a time into :class:`WriteBehind`'s two buffers, so
that receiving (SSL_read) and writing overlap; it answers 413 past the upload limit, 400 for a
truncated, stalled or malformed body and 507 when the spool runs out of room while a chunked
body of unknown length arrives.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import bottle

from ingest.connection import TOO_LARGE
from ingest.responses import RECEIVED, bad_request, reply
from ingest.upload_check import UploadCheck
from metrics import IngestMetrics

__all__ = ["CHUNK", "SPACE_CHECK_BYTES", "WriteBehind", "insufficient_storage", "receive",
           "too_large"]

CHUNK = 1 << 20
SPACE_CHECK_BYTES = 64 << 20


class WriteBehind:
    """Writes filled buffers in a helper thread while the next one is received.

    Receiving (SSL_read), hashing and writing all release the GIL, so with two buffers they
    overlap on two cores. A write error is raised by the next :meth:`buffer` or by
    :meth:`close`; buffers are written in order.
    """

    def __init__(self, write: Callable[[memoryview], None], size: int) -> None:
        self._write = write
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(2):
            self._free.put(memoryview(bytearray(size)))
        self._full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ingest-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            view, n = item
            if self._error is None:
                try:
                    self._write(view[:n])
                except BaseException as err:  # handed to the receiving thread
                    self._error = err
            self._free.put(view)

    def buffer(self) -> memoryview:
        """A free buffer (waits while both are being written)."""
        view = self._free.get()
        if self._error is not None:
            raise self._error
        return view

    def put(self, view: memoryview, n: int) -> None:
        """Queue the first ``n`` bytes of ``view`` for writing."""
        self._full.put((view, n))

    def close(self) -> None:
        """Wait until everything queued is written; raise the write error, if any."""
        self.abort()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the writer thread (after what is queued); idempotent."""
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()


def free_bytes(directory: os.PathLike[str] | str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def insufficient_storage(close: bool = False) -> bottle.HTTPResponse:
    """507: the spool has no room for this upload."""
    return reply("507 Insufficient Storage",
                 "Insufficient storage in the spool, try again later\n", close=close)


def too_large(limit: int) -> bottle.HTTPResponse:
    """413: the upload is over ``limit`` bytes (the connection closes: the rest is unread)."""
    return reply("413 Request Entity Too Large",
                 f"Upload too large: the limit is {limit} bytes\n", close=True)


def receive(environ: dict[str, Any], length: int | None,
            write: Callable[[memoryview], None] | None, *, limit: int,
            metrics: IngestMetrics, room: Callable[[], bool],
            check: UploadCheck | None = None) -> int:
    """Read the whole body into ``write`` (None: discard); the byte count.

    ``length`` is the Content-Length (None: chunked); ``limit`` the largest upload accepted;
    ``room()`` says whether the spool still has its reserve (asked every
    ``SPACE_CHECK_BYTES`` of a chunked body); ``check`` judges the tarball as it arrives (a
    bad one is answered 400 with the reason, at once). Problems are raised as the answer.
    """
    stream = environ["wsgi.input"]
    readinto = getattr(stream, "readinto", None)  # ours: no copy, no allocation per read
    sink = WriteBehind(write, CHUNK) if write is not None else None
    spare = memoryview(bytearray(CHUNK))
    total = 0
    next_check = SPACE_CHECK_BYTES
    metrics.uploads_in_progress.inc()
    finished = False
    try:
        while length is None or total < length:
            want = CHUNK if length is None else min(CHUNK, length - total)
            buffer = sink.buffer() if sink is not None else spare  # raises write errors
            try:
                if readinto is not None:
                    n = readinto(buffer[:want])
                else:
                    data = stream.read(want)
                    n = len(data)
                    buffer[:n] = data
            except OSError as err:
                if TOO_LARGE in str(err):
                    raise too_large(limit) from None
                what = "timed out" if isinstance(err, TimeoutError) else "connection lost"
                of = "" if length is None else f" of {length}"
                raise bad_request(f"upload {what} after {total}{of} bytes", close=True) from None
            except ValueError as err:
                raise bad_request(f"malformed chunked body: {err}", close=True) from None
            if n == 0:
                if length is None:
                    break
                raise bad_request(f"body shorter than Content-Length ({total} of {length} "
                                  "bytes)", close=True)
            total += n
            environ[RECEIVED] = total
            if total > limit:
                raise too_large(limit)
            if check is not None:
                check.feed(buffer[:n])
                if check.problem is not None:
                    raise bad_request(check.problem, close=True)
            if sink is not None:
                sink.put(buffer, n)
                if length is None and total >= next_check:
                    next_check += SPACE_CHECK_BYTES
                    if not room():
                        raise insufficient_storage(close=True)
        if check is not None and (problem := check.finish()) is not None:
            raise bad_request(problem)
        finished = True
        if sink is not None:
            sink.close()  # everything written; raises a write error
    finally:
        if check is not None and not finished:
            check.abort()
        if sink is not None:
            sink.abort()
        metrics.uploads_in_progress.dec()
    return total
