"""The content-addressed object store of a stratum 0: ``data/XX/<rest-of-hash><suffix>``.

Objects are zlib streams (RFC 1950) made exactly as CernVM-FS makes them (:mod:`.compression`:
genuine stratum 1s and ``cvmfs_fsck`` re-compress and compare) and named by the SHA-1 of the
*compressed* bytes, as CVMFS does by default. An object is written to ``data/txn/`` and renamed
into place, so a name never shows partial content; an object that already exists with the
expected size is not written again, and content the :class:`.ContentIndex` knows is not even
compressed again (deduplication).

:class:`ObjectPipeline` compresses, hashes and stores objects in batches in worker processes,
bounded in the bytes it holds, so the tar stream, chunking and compression use every core.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from publisher.repositories.cvmfs_native.chunking import ChunkParams, split
from publisher.repositories.cvmfs_native.compression import compress, decompress
from publisher.repositories.cvmfs_native.contents import (
    INDEX_NAME,
    ContentIndex,
    Entry,
    Key,
    content_key,
)
from publisher.repositories.cvmfs_native.layout import WORK

# Object name suffixes (cvmfs Digest::MakePath): none for file content.
CATALOG, HISTORY, CERTIFICATE, METAINFO, PARTIAL = "C", "H", "X", "M", "P"
SUFFIXES = ("", CATALOG, HISTORY, CERTIFICATE, METAINFO, PARTIAL, "L")
_FILE_MODE = 0o644
_PR_SET_PDEATHSIG = 1
log = logging.getLogger("userpub.repository.cvmfs_native")

__all__ = ["CATALOG", "CERTIFICATE", "HISTORY", "METAINFO", "PARTIAL", "SUFFIXES", "FileTicket",
           "ObjectPipeline", "ObjectStore", "StoredObject", "Ticket", "compress", "decompress",
           "object_digest", "store_file", "worker_init"]


def object_digest(stored: bytes) -> bytes:
    """The 20-byte content hash of stored (compressed) bytes."""
    return hashlib.sha1(stored).digest()  # noqa: S324 (the CVMFS default content hash)


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object in the store: its digest, stored size and whether this call wrote it."""

    digest: bytes
    stored_size: int
    new: bool
    compressed: bool = True  # False: found through the content index, not compressed again

    @property
    def hex(self) -> str:
        """The digest as CVMFS prints it (SHA-1: 40 lowercase hex digits, no suffix)."""
        return self.digest.hex()


class ObjectStore:
    """``<root>/data``: put, get, list and delete objects."""

    def __init__(self, root: Path, txn: Path | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.txn = txn or self.data / "txn"  # temporary files (on the same filesystem)
        self._names = itertools.count()
        self._index: ContentIndex | None = None

    @property
    def index_path(self) -> Path:
        """The content index (``.userpub/contents.sqlite``)."""
        return self.root / WORK / INDEX_NAME

    def index(self, *, create: bool = False) -> ContentIndex | None:
        """The content index; None if there is none (``create``: make one, for the writer)."""
        if self._index is None:
            if create:
                index = ContentIndex(self.index_path)
                try:
                    self.index_path.parent.mkdir(parents=True, exist_ok=True)
                    index.prepare()
                except (OSError, sqlite3.Error) as err:  # a cache: publishing goes on without
                    log.warning("%s: no content index: %s", self.index_path, err)
                    index.close()
                    return None
                self._index = index
            elif self.index_path.exists():
                self._index = ContentIndex(self.index_path)
        return self._index

    def close_index(self) -> None:
        """Close the content index's connection (reopened when needed)."""
        if self._index is not None:
            self._index.close()

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

    def present(self, digest: bytes, suffix: str, stored_size: int) -> bool:
        """True when the object is stored under its name with that size."""
        try:
            return os.stat(self.path(digest.hex(), suffix)).st_size == stored_size
        except FileNotFoundError:
            return False

    def put_data(self, data: bytes | memoryview, suffix: str = "") -> StoredObject:
        """Compress ``data`` and store it (unless the content index knows it is stored)."""
        return self.put_many([(data, suffix)])[0]

    def put_many(self, items: Sequence[tuple[bytes | memoryview, str]]) -> list[StoredObject]:
        """Store several contents; those the content index knows are not compressed again."""
        index = self.index()
        if index is None:
            return [self.put(compress(data), suffix) for data, suffix in items]
        keys = [content_key(data, suffix) for data, suffix in items]
        known = index.lookup(set(keys))
        out: list[StoredObject] = []
        learned: dict[Key, Entry] = {}
        for key, (data, suffix) in zip(keys, items, strict=True):
            hit = known.get(key)
            if hit is not None and self.present(hit[0], suffix, hit[1]):
                out.append(StoredObject(hit[0], hit[1], new=False, compressed=False))
                continue
            stored = self.put(compress(data), suffix)
            out.append(stored)
            learned[key] = known[key] = (stored.digest, stored.stored_size)
        index.record(learned.items())
        return out

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


_Result = tuple[bytes, int, bool, bool]  # a StoredObject across processes


def _pack(o: StoredObject) -> _Result:
    return o.digest, o.stored_size, o.new, o.compressed


def _unpack(r: _Result) -> StoredObject:
    return StoredObject(r[0], r[1], r[2], r[3])


def _store_batch(root: str, items: list[tuple[bytes, str]]) -> list[_Result]:
    """Worker-process side of :class:`ObjectPipeline`: compress, hash and store a batch."""
    store = ObjectStore(Path(root))
    try:
        return [_pack(o) for o in store.put_many(items)]
    finally:
        store.close_index()


def store_file(store: ObjectStore, data: bytes | memoryview, params: ChunkParams
               ) -> list[tuple[int, StoredObject]]:
    """Store one file: whole (one element, suffix none) or as ``P`` chunks by the CVMFS rules."""
    pieces = split(data, params) if len(data) > params.minimum else [memoryview(data)]
    if len(pieces) == 1:
        return [(len(data), store.put_data(data))]
    return list(zip((len(p) for p in pieces), store.put_many([(p, PARTIAL) for p in pieces]),
                    strict=True))


def _store_file(root: str, data: bytes, params: ChunkParams) -> list[tuple[int, _Result]]:
    """Worker-process side of :meth:`ObjectPipeline.submit_file`."""
    store = ObjectStore(Path(root))
    try:
        return [(size, _pack(o)) for size, o in store_file(store, data, params)]
    finally:
        store.close_index()


class FileTicket:
    """The promised objects of one file: ``[(size, object)]``, one element if not chunked."""

    __slots__ = ("_future", "_value")

    def __init__(self, future: Future[list[tuple[int, _Result]]] | None,
                 value: list[tuple[int, StoredObject]] | None = None) -> None:
        self._future = future
        self._value = value

    def result(self) -> list[tuple[int, StoredObject]]:
        """The stored pieces; raises what storing raised."""
        if self._value is None:
            assert self._future is not None
            self._value = [(size, _unpack(r)) for size, r in self._future.result()]
        return self._value


def worker_init(parent: int) -> None:
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
        self.future: Future[list[_Result]] | None = None
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
            batch.results = [_unpack(r) for r in batch.future.result()]
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
                                          initializer=worker_init, initargs=(os.getpid(),))
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
            batch.results = self.store.put_many(batch.items)
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
