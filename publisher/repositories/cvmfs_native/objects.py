"""The content-addressed object store of a stratum 0: ``data/XX/<rest-of-hash><suffix>``.

Objects are zlib streams (RFC 1950) named by the SHA-1 of the *compressed* bytes, as CVMFS
does by default. Compression uses ISA-L's zlib-compatible deflate at level 1 (several times
faster than zlib and releasing the GIL); any zlib reader inflates it. An object is written to
``data/txn/`` and renamed into place, so a name never shows partial content; an object that
already exists with the expected size is not written again (deduplication).

:class:`ObjectPipeline` compresses, hashes and stores objects in batches in worker processes,
bounded in the bytes it holds, so the tar stream, chunking and compression use every core.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import signal
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from isal import isal_zlib

from publisher.repositories.cvmfs_native.chunking import ChunkParams, split

_LEVEL = 1  # ISA-L levels are 0-3; 1 is several times faster than zlib's 1 at similar size

# Object name suffixes (cvmfs Digest::MakePath): none for file content.
CATALOG, HISTORY, CERTIFICATE, METAINFO, PARTIAL = "C", "H", "X", "M", "P"
SUFFIXES = ("", CATALOG, HISTORY, CERTIFICATE, METAINFO, PARTIAL, "L")
_FILE_MODE = 0o644
_PR_SET_PDEATHSIG = 1


def compress(data: bytes | memoryview) -> bytes:
    """One zlib stream of ``data``."""
    return bytes(isal_zlib.compress(data, _LEVEL))


def decompress(data: bytes) -> bytes:
    """Inflate one zlib stream (zlib.error if it is not one)."""
    return zlib.decompress(data)


def object_digest(stored: bytes) -> bytes:
    """The 20-byte content hash of stored (compressed) bytes."""
    return hashlib.sha1(stored).digest()  # noqa: S324 (the CVMFS default content hash)


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object in the store: its digest, stored size and whether this call wrote it."""

    digest: bytes
    stored_size: int
    new: bool

    @property
    def hex(self) -> str:
        """The digest as CVMFS prints it (SHA-1: 40 lowercase hex digits, no suffix)."""
        return self.digest.hex()


class ObjectStore:
    """``<root>/data``: put, get, list and delete objects."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.txn = self.data / "txn"
        self._names = itertools.count()

    def ensure_layout(self) -> None:
        """Create ``data/00`` .. ``data/ff`` and ``data/txn`` (idempotent)."""
        for i in range(256):
            (self.data / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        self.txn.mkdir(exist_ok=True)

    def path(self, hex_digest: str, suffix: str = "") -> Path:
        """Where the object lives."""
        return self.data / hex_digest[:2] / f"{hex_digest[2:]}{suffix}"

    def temp_path(self, label: str = "tmp") -> Path:
        """A fresh name in ``data/txn`` (the caller creates the file)."""
        return self.txn / f"{label}.{os.getpid()}.{threading.get_ident()}.{next(self._names)}"

    def put(self, stored: bytes, suffix: str = "") -> StoredObject:
        """Store already compressed bytes under their hash; skip if already present."""
        digest = object_digest(stored)
        final = self.path(digest.hex(), suffix)
        try:
            if os.stat(final).st_size == len(stored):
                return StoredObject(digest, len(stored), new=False)
        except FileNotFoundError:
            pass
        tmp = self.temp_path("obj")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            view = memoryview(stored)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, final)
        return StoredObject(digest, len(stored), new=True)

    def put_data(self, data: bytes | memoryview, suffix: str = "") -> StoredObject:
        """Compress ``data`` and store it."""
        return self.put(compress(data), suffix)

    def put_file(self, path: Path, suffix: str) -> StoredObject:
        """Compress a file (a finished catalog or history database) and store it."""
        return self.put_data(path.read_bytes(), suffix)

    def get(self, hex_digest: str, suffix: str = "") -> bytes:
        """The inflated content of an object; FileNotFoundError if it is absent."""
        return decompress(self.path(hex_digest, suffix).read_bytes())

    def names(self) -> Iterator[tuple[str, Path]]:
        """Every stored object as (``<hex><suffix>``, path); ``data/txn`` excluded."""
        for i in range(256):
            sub = self.data / f"{i:02x}"
            try:
                entries = list(os.scandir(sub))
            except FileNotFoundError:
                continue
            for de in entries:
                yield f"{i:02x}{de.name}", Path(de.path)

    def clear_txn(self) -> int:
        """Remove leftovers of interrupted writes in ``data/txn``; return how many."""
        count = 0
        try:
            entries = list(os.scandir(self.txn))
        except FileNotFoundError:
            return 0
        for de in entries:
            try:
                os.unlink(de.path)
                count += 1
            except IsADirectoryError:
                continue
            except FileNotFoundError:
                continue
        return count


def _store_batch(root: str, items: list[tuple[bytes, str]]) -> list[tuple[bytes, int, bool]]:
    """Worker-process side of :class:`ObjectPipeline`: compress, hash and store a batch."""
    store = ObjectStore(Path(root))
    return [(o.digest, o.stored_size, o.new) for o in (store.put_data(d, s) for d, s in items)]


def store_file(store: ObjectStore, data: bytes | memoryview, params: ChunkParams
               ) -> list[tuple[int, StoredObject]]:
    """Store one file: whole (one element, suffix none) or as ``P`` chunks by the CVMFS rules."""
    pieces = split(data, params) if len(data) > params.minimum else [memoryview(data)]
    if len(pieces) == 1:
        return [(len(data), store.put_data(data))]
    return [(len(p), store.put_data(p, PARTIAL)) for p in pieces]


def _store_file(root: str, data: bytes, params: ChunkParams) -> list[tuple[int, bytes, int, bool]]:
    """Worker-process side of :meth:`ObjectPipeline.submit_file`."""
    return [(size, o.digest, o.stored_size, o.new)
            for size, o in store_file(ObjectStore(Path(root)), data, params)]


class FileTicket:
    """The promised objects of one file: ``[(size, object)]``, one element if not chunked."""

    __slots__ = ("_future", "_value")

    def __init__(self, future: Future[list[tuple[int, bytes, int, bool]]] | None,
                 value: list[tuple[int, StoredObject]] | None = None) -> None:
        self._future = future
        self._value = value

    def result(self) -> list[tuple[int, StoredObject]]:
        """The stored pieces; raises what storing raised."""
        if self._value is None:
            assert self._future is not None
            self._value = [(size, StoredObject(d, n, new))
                           for size, d, n, new in self._future.result()]
        return self._value


def _worker_init(parent: int) -> None:
    """Make a worker die with the process that started it (even by ``kill -9``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


class _Batch:
    """Objects stored together by one worker call."""

    __slots__ = ("future", "items", "results", "size")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, str]] = []
        self.size = 0
        self.future: Future[list[tuple[bytes, int, bool]]] | None = None
        self.results: list[StoredObject] | None = None


class Ticket:
    """A promised :class:`StoredObject` (from a batch that may still be running)."""

    __slots__ = ("_batch", "_index", "_pipeline")

    def __init__(self, pipeline: ObjectPipeline, batch: _Batch, index: int) -> None:
        self._pipeline = pipeline
        self._batch = batch
        self._index = index

    def result(self) -> StoredObject:
        """The stored object; raises what storing raised."""
        batch = self._batch
        if batch.results is None:
            if batch.future is None:
                self._pipeline.flush()
            assert batch.future is not None
            batch.results = [StoredObject(d, n, new) for d, n, new in batch.future.result()]
        return batch.results[self._index]


class ObjectPipeline:
    """Compress, hash and store objects in worker processes, in batches.

    Worker *processes* (not threads) keep the many small system calls of storing objects away
    from the interpreter lock of the process that parses the tar stream. ``processes=0``
    stores inline (small tarballs: no start-up cost). At most ``max_bytes`` are in flight.
    """

    def __init__(self, store: ObjectStore, processes: int = 0, *, batch_bytes: int = 1 << 20,
                 batch_count: int = 128, max_bytes: int = 384 << 20) -> None:
        self.store = store
        self._pool = (ProcessPoolExecutor(processes, mp_context=get_context("spawn"),
                                          initializer=_worker_init, initargs=(os.getpid(),))
                      if processes else None)
        self._batch = _Batch()
        self._inflight: list[tuple[Future[Any], int]] = []
        self._held = 0
        self._batch_bytes = batch_bytes
        self._batch_count = batch_count
        self._max = max_bytes

    def submit(self, data: bytes, suffix: str = "") -> Ticket:
        """Queue ``data`` to be stored as an object."""
        batch = self._batch
        batch.items.append((data, suffix))
        batch.size += len(data)
        ticket = Ticket(self, batch, len(batch.items) - 1)
        full = batch.size >= self._batch_bytes or len(batch.items) >= self._batch_count
        if full or self._pool is None:
            self.flush()
        return ticket

    def submit_file(self, data: bytes, params: ChunkParams) -> FileTicket:
        """Queue one large file, chunked and stored by a worker."""
        if self._pool is None:
            return FileTicket(None, store_file(self.store, data, params))
        self._make_room(len(data))
        future = self._pool.submit(_store_file, str(self.store.root), data, params)
        self._inflight.append((future, len(data)))
        self._held += len(data)
        return FileTicket(future)

    def _make_room(self, size: int) -> None:
        while self._inflight and self._held + size > self._max:
            future, held = self._inflight.pop(0)
            future.exception()  # wait; errors surface through the tickets
            self._held -= held

    def flush(self) -> None:
        """Start storing the current batch."""
        batch = self._batch
        if not batch.items:
            return
        self._batch = _Batch()
        if self._pool is None:
            batch.results = [self.store.put_data(d, s) for d, s in batch.items]
            batch.items = []
            return
        self._make_room(batch.size)
        batch.future = self._pool.submit(_store_batch, str(self.store.root), batch.items)
        batch.items = []
        self._inflight.append((batch.future, batch.size))
        self._held += batch.size

    def close(self) -> None:
        """Store what is queued, wait for it and stop the workers."""
        self.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._inflight.clear()
        self._held = 0
