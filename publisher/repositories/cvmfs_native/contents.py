"""The content index: which stored object already holds some content, so it is not compressed again.

Compressing as CernVM-FS does (zlib level 6) costs about 25 times more than hashing, and a
republished tarball is mostly content the store already has. ``.userpub/contents.sqlite``
(never served) maps the SHA-256 of an object's *uncompressed* content and its suffix to the
object's name and stored size. It is only a hint: an entry is used when the object is present
under that name with that size (the same trust as the store's own name check), a missing
entry only costs one compression, and an unreadable index is started afresh. SHA-256, not
SHA-1, so that nobody can craft content that collides with someone else's. Entries are written
by whichever process stored the object (worker processes included; SQLite serialises them),
and garbage collection forgets the objects it deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from publisher.repositories.cvmfs_native.compression import REFERENCE_SHA1

log = logging.getLogger("userpub.repository.cvmfs_native")

INDEX_NAME = "contents.sqlite"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS properties (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS contents (content BLOB, suffix TEXT, digest BLOB NOT NULL, "
    "stored_size INTEGER NOT NULL, PRIMARY KEY (content, suffix)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS contents_by_digest ON contents (digest)",
)
#: Entries made by another compressor are worthless: the index remembers which one it holds.
_COMPRESSOR = f"zlib-default:{REFERENCE_SHA1}"
_BUSY_MS = 120_000
_LOOKUP_BATCH = 500  # keys per query (below SQLite's limit of bound parameters)

Key = tuple[bytes, str]  # (SHA-256 of the content, object suffix)
Entry = tuple[bytes, int]  # (object digest, stored size)


def content_key(data: bytes | memoryview, suffix: str) -> Key:
    """The index key of ``data`` stored with ``suffix``."""
    return hashlib.sha256(data).digest(), suffix


class ContentIndex:
    """One repository's index file; every method opens its own short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the connection (it is reopened on the next use)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def prepare(self) -> None:
        """Create the index, or start it afresh if it is unreadable or from another compressor."""
        try:
            self._prepare()
        except sqlite3.Error as err:
            log.warning("%s: content index unusable (%s); starting a new one", self.path, err)
            self.close()
            for name in (self.path.name, f"{self.path.name}-wal", f"{self.path.name}-shm"):
                (self.path.parent / name).unlink(missing_ok=True)
            self._prepare()

    def _prepare(self) -> None:
        conn = self._open()
        with _transaction(conn):
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM properties WHERE key = 'compressor'").fetchone()
            if row is None or row[0] != _COMPRESSOR:
                conn.execute("DELETE FROM contents")
                conn.execute("INSERT OR REPLACE INTO properties VALUES ('compressor', ?)",
                             (_COMPRESSOR,))

    def lookup(self, keys: Iterable[Key]) -> dict[Key, Entry]:
        """The known objects of these keys (absent keys are left out; errors find nothing)."""
        wanted = set(keys)
        contents = sorted({content for content, _ in wanted})
        found: dict[Key, Entry] = {}
        try:
            conn = self._open()
            for start in range(0, len(contents), _LOOKUP_BATCH):
                part = contents[start:start + _LOOKUP_BATCH]
                marks = ",".join("?" * len(part))
                for content, suffix, digest, size in conn.execute(
                        "SELECT content, suffix, digest, stored_size FROM contents "  # noqa: S608
                        f"WHERE content IN ({marks})", part):
                    if (key := (bytes(content), suffix)) in wanted:
                        found[key] = (bytes(digest), int(size))
        except sqlite3.Error as err:
            log.warning("%s: content index not readable (%s)", self.path, err)
        return found

    def record(self, entries: Iterable[tuple[Key, Entry]]) -> None:
        """Remember stored objects (best effort: a failure only costs compressions later)."""
        rows = [(content, suffix, digest, size) for (content, suffix), (digest, size) in entries]
        if not rows:
            return
        try:
            conn = self._open()
            with _transaction(conn):
                conn.executemany("INSERT OR REPLACE INTO contents VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error as err:
            log.warning("%s: content index not writable (%s)", self.path, err)

    def forget(self, digests: Iterable[bytes]) -> None:
        """Drop the entries of deleted objects."""
        rows = [(d,) for d in digests]
        try:
            conn = self._open()
            with _transaction(conn):
                conn.executemany("DELETE FROM contents WHERE digest = ?", rows)
        except sqlite3.Error as err:
            log.warning("%s: content index not writable (%s)", self.path, err)

    def count(self) -> int:
        """How many contents the index knows."""
        (n,) = self._open().execute("SELECT count(*) FROM contents").fetchone()
        return int(n)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
