"""The content-addressed object store of a stratum 0: ``data/XX/<rest-of-hash><suffix>``.

Objects are zlib streams (RFC 1950) named by the SHA-1 of the *compressed* bytes, as CVMFS
does by default. Compression uses ISA-L's zlib-compatible deflate at level 1 (several times
faster than zlib and releasing the GIL); any zlib reader inflates it. An object is written to
``data/txn/`` and renamed into place, so a name never shows partial content; an object that
already exists with the expected size is not written again (deduplication).

:class:`ObjectPipeline` compresses, hashes and stores objects on a thread pool, bounded in
the bytes it holds, so the tar stream, chunking and compression use every core.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from isal import isal_zlib

_LEVEL = 1  # ISA-L levels are 0-3; 1 is several times faster than zlib's 1 at similar size

# Object name suffixes (cvmfs Digest::MakePath): none for file content.
CATALOG, HISTORY, CERTIFICATE, METAINFO, PARTIAL = "C", "H", "X", "M", "P"
SUFFIXES = ("", CATALOG, HISTORY, CERTIFICATE, METAINFO, PARTIAL, "L")
_FILE_MODE = 0o644


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
        self._lock = threading.Lock()
        self.written_objects = 0
        self.written_bytes = 0

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
        with self._lock:
            self.written_objects += 1
            self.written_bytes += len(stored)
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

    def exists(self, hex_digest: str, suffix: str = "") -> bool:
        """True when the object is stored."""
        return self.path(hex_digest, suffix).is_file()

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


class ObjectPipeline:
    """Compress, hash and store objects on worker threads, holding at most ``max_bytes``."""

    def __init__(self, store: ObjectStore, workers: int | None = None,
                 max_bytes: int = 256 << 20) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2),
                                        thread_name_prefix="cvmfs-objects")
        self._max = max_bytes
        self._held = 0
        self._cond = threading.Condition()

    def submit(self, data: bytes, suffix: str = "") -> Future[StoredObject]:
        """Queue ``data`` for storing; blocks while too many bytes are in flight."""
        size = len(data)
        with self._cond:
            while self._held and self._held + size > self._max:
                self._cond.wait()
            self._held += size
        future = self._pool.submit(self.store.put_data, data, suffix)
        future.add_done_callback(lambda _f: self._release(size))
        return future

    def _release(self, size: int) -> None:
        with self._cond:
            self._held -= size
            self._cond.notify_all()

    def close(self) -> None:
        """Finish queued work and stop the threads."""
        self._pool.shutdown(wait=True, cancel_futures=False)
