"""Judging an upload while it streams: a tarball the publisher would refuse fails the POST.

jobsub_lite and justIN only poll ``exists`` after an ``OK``: a tarball answered ``OK`` that the
publisher then refuses leaves its user waiting for a CID that never comes. So the upload's
bytes also go, as they arrive, to a thread that decompresses them with the publisher's
decoders and reads the tar stream with the publisher's parser and member rules
(:mod:`publisher.tarball`): not compressed data we know, not a tar, a bad header, a truncated
stream, a hostile member (an absolute path, a file written through a symlink, a device, too
many members or bytes) all fail the POST with the reason the publisher would have given.
What only the backend can find out (a full repository) still shows in ``status``.

gzip, zstd and plain tar are judged whole (their decoders run at hundreds of MB/s on the
other core; inflating gzip is still the judge's main cost, about 1 CPU-second per GB); bzip2
and xz, whose decoders are several times slower than any network, are judged on their first
``PREFIX_BYTES`` of compressed input, the rest by the publisher. With ``whole=False`` every
upload is judged on its first ``PREFIX_BYTES`` only (``check_uploads = "head"``).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable, Mapping

from publisher.tarball.decompress import ChunkSource, UnpackError, detect_compression, open_chunks
from publisher.tarball.rules import MemberRules, UnpackLimits
from publisher.tarball.stream import DIR, LNK, REG, SYM, Member, TarReader

__all__ = ["PREFIX_BYTES", "UploadCheck"]

HEAD_BYTES = 4096  # what compression detection looks at
PREFIX_BYTES = 8 << 20  # compressed bytes of bzip2/xz judged at upload
FULL = ("gzip", "zstd", "none")
_DEPTH = 4  # chunks waiting for the judge: bounded memory, and back-pressure on the upload


class _Feed(io.RawIOBase):
    """A readable stream of the chunks handed to :meth:`UploadCheck.feed` (EOF at None)."""

    def __init__(self, chunks: queue.Queue[bytes | None], limit: int | None) -> None:
        self.chunks = chunks
        self.limit = limit  # None: everything; else EOF after this many bytes
        self.cut = False  # True once the limit ended the stream early
        self._current = memoryview(b"")
        self._given = 0
        self.eof = False  # the end (None) was taken from the queue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while not self._current and not self.eof:
            item = self.chunks.get()
            if item is None:
                self.eof = True
            else:
                self._current = memoryview(item)
        if self.limit is not None and self._given >= self.limit:
            self.cut = True
            return 0
        n = min(len(view), len(self._current))
        if self.limit is not None:
            n = min(n, self.limit - self._given)
        view[:n] = self._current[:n]
        self._current = self._current[n:]
        self._given += n
        return n


class UploadCheck:
    """The judge of one upload: :meth:`feed` every received piece, then :meth:`finish`.

    ``root_len`` is the length of the longest path the CID directory may have where readers
    see it (for the PATH_MAX rule). :attr:`problem` is set as soon as the stream is found bad;
    the upload can stop there.
    """

    def __init__(self, limits: UnpackLimits, root_len: int, *, whole: bool = True) -> None:
        self.limits = limits
        self.root_len = root_len
        self.whole = whole
        self.problem: str | None = None
        self.compression: str | None = None
        self._head = bytearray()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(_DEPTH)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def feed(self, data: bytes | memoryview) -> None:
        """The next received bytes (copied); waits while the judge is ``_DEPTH`` pieces behind."""
        if self.problem is not None or self._stopped.is_set():
            return
        if self._thread is None:
            self._head += data
            if len(self._head) >= HEAD_BYTES:
                self._start()
            return
        self._put(bytes(data))

    def finish(self) -> str | None:
        """The end of the upload: wait for the judge; the problem found, or None."""
        if self._thread is None and self.problem is None:
            self._start()
        self._put(None)
        if self._thread is not None:
            self._thread.join()
        return self.problem

    def abort(self) -> None:
        """The upload failed for another reason: stop the judge without waiting for it."""
        self._stopped.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._chunks.put(None, timeout=0.05)
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._chunks.get_nowait()
            self._thread.join()

    # -- the judge's thread ----------------------------------------------------------------
    def _put(self, item: bytes | None) -> None:
        while self._thread is not None and self._thread.is_alive():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _start(self) -> None:
        head = bytes(self._head)
        self._head = bytearray()
        try:
            self.compression = detect_compression(head[:HEAD_BYTES])
        except UnpackError as err:
            self.problem = str(err)
            return
        limit = None if self.whole and self.compression in FULL else PREFIX_BYTES
        feed = _Feed(self._chunks, limit)
        self._thread = threading.Thread(target=self._judge, args=(feed,),
                                        name="ingest-check", daemon=True)
        self._thread.start()
        self._put(head)

    def _judge(self, feed: _Feed) -> None:
        try:
            self._read(feed)
        except UnpackError as err:
            if not feed.cut:  # past the judged prefix, the publisher decides
                self.problem = str(err)
        except Exception as err:
            self.problem = None if feed.cut else f"unreadable tarball: {err}"
        finally:
            while not feed.eof:  # let the receiving side finish: drain what it hands over
                feed.eof = self._chunks.get() is None

    def _read(self, feed: _Feed) -> None:
        assert self.compression is not None
        rules = MemberRules(self.root_len, self.limits)
        judge = {REG: rules.file, DIR: rules.directory, SYM: rules.symlink,
                 LNK: rules.hardlink}
        stream = io.BufferedReader(feed, 1 << 20)
        if self.compression == "none":
            self._members(_Plain(stream), judge)
            return
        with open_chunks(stream, self.compression, use_programs=False) as chunks:
            self._members(chunks, judge)

    def _members(self, chunks: ChunkSource, judge: Mapping[str, Callable[[Member], object]]
                 ) -> None:
        reader = TarReader(chunks, 3 * self.limits.max_members + 16, self.limits.max_bytes)
        for member in reader:
            if self._stopped.is_set():
                return
            judge[member.kind](member)


class _Plain:
    """The chunks of an uncompressed stream."""

    def __init__(self, stream: io.BufferedReader[_Feed]) -> None:
        self.stream = stream

    def read(self) -> bytes:
        return self.stream.read1(1 << 20)
