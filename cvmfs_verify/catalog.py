"""Read-only access to the SQLite databases of a repository: file catalogs (schema 2.5, spec §6-§8),
the history (tag) database and the reflog (spec §9). Databases are opened from the inflated bytes
of their objects, in memory; nothing is written back.
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass

from cvmfs_verify.hashes import ContentHash, md5_pair

FLAG_DIR = 1
FLAG_NESTED_MOUNTPOINT = 2
FLAG_FILE = 4
FLAG_LINK = 8
FLAG_SPECIAL = 16
FLAG_NESTED_ROOT = 32
FLAG_CHUNKED = 64
FLAG_EXTERNAL = 128
FLAG_BIND_MOUNTPOINT = 0x4000
FLAG_HIDDEN = 0x8000
FLAG_DIRECT_IO = 0x10000

#: The 12 counters of ``catalog_counters.h``; each is stored as ``self_<c>`` and ``subtree_<c>``.
COUNTERS: tuple[str, ...] = ("regular", "symlink", "special", "dir", "nested", "chunked", "chunks",
                             "file_size", "chunked_size", "xattr", "external",
                             "external_file_size")

_ENTRY_COLUMNS = ("md5path_1, md5path_2, parent_1, parent_2, hardlinks, hash, size, mode, mtime, "
                  "flags, name, symlink, uid, gid, xattr")


class DatabaseError(Exception):
    """Bytes that are not an SQLite database of the expected shape."""


def open_database(data: bytes) -> sqlite3.Connection:
    """An in-memory, query-only SQLite connection on ``data`` (text returned as bytes)."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.deserialize(data)
        connection.text_factory = bytes
        connection.execute("PRAGMA query_only = 1")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as err:
        connection.close()
        raise DatabaseError(f"not an SQLite database ({err})") from None
    return connection


def properties(connection: sqlite3.Connection) -> dict[str, str]:
    """The ``properties`` table as text."""
    try:
        rows = connection.execute("SELECT key, value FROM properties").fetchall()
    except sqlite3.Error as err:
        raise DatabaseError(f"cannot read table properties ({err})") from None
    return {_text(k): _text(v) for k, v in rows}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def display(path: bytes) -> str:
    """A repository path for messages (``/`` for the root)."""
    return path.decode("utf-8", "backslashreplace") or "/"


@dataclass(frozen=True)
class Entry:
    """One ``catalog`` row."""

    md5: tuple[int, int]
    parent: tuple[int, int]
    hardlinks: int
    hash: bytes | None
    size: int
    mode: int
    mtime: int
    flags: int
    name: bytes
    symlink: bytes | None
    uid: int
    gid: int
    xattr: bytes | None

    @property
    def linkcount(self) -> int:
        """Low 32 bits of ``hardlinks``."""
        return self.hardlinks & 0xFFFFFFFF

    @property
    def hardlink_group(self) -> int:
        """High 32 bits of ``hardlinks``."""
        return self.hardlinks >> 32

    @property
    def is_dir(self) -> bool:
        """A directory, by ``mode``."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        """A symbolic link, by ``mode``."""
        return stat.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        """A regular file, by ``mode``."""
        return stat.S_ISREG(self.mode)

    @property
    def has_xattrs(self) -> bool:
        """True when the row carries extended attributes."""
        return bool(self.xattr)

    def has(self, flag: int) -> bool:
        """True when ``flags`` has all bits of ``flag``."""
        return self.flags & flag == flag

    def content_hash(self) -> ContentHash | None:
        """The row's content hash (HashError when malformed), or None."""
        return None if self.hash is None else ContentHash.from_blob(self.hash, self.flags)


@dataclass(frozen=True)
class Chunk:
    """One ``chunks`` row."""

    offset: int
    size: int
    hash: bytes


@dataclass(frozen=True)
class Reference:
    """A ``nested_catalogs`` or ``bind_mountpoints`` row."""

    path: bytes
    hash: str
    size: int | None


class Catalog:
    """A file catalog opened from its inflated bytes."""

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._db = open_database(data)
        self.properties = properties(self._db)
        for table in ("catalog", "chunks", "nested_catalogs", "statistics"):
            if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                    (table,)).fetchone():
                self.close()
                raise DatabaseError(f"table {table} missing")

    def close(self) -> None:
        """Release the in-memory database."""
        self._db.close()

    @property
    def root_prefix(self) -> bytes:
        """The mountpoint of a nested catalog; ``b""`` for the root catalog."""
        return self.properties.get("root_prefix", "").encode("utf-8", "surrogateescape")

    def _entries(self, sql: str, args: tuple[object, ...] = ()) -> list[Entry]:
        try:
            query = f"SELECT {_ENTRY_COLUMNS} FROM catalog {sql}"  # noqa: S608 (constant fragments)
            rows = self._db.execute(query, args).fetchall()
        except sqlite3.Error as err:
            raise DatabaseError(f"cannot read table catalog ({err})") from None
        return [Entry((r[0], r[1]), (r[2], r[3]), r[4] or 0, r[5], r[6] or 0, r[7] or 0,
                      r[8] or 0, r[9] or 0, r[10] if r[10] is not None else b"", r[11],
                      r[12] or 0, r[13] or 0, r[14]) for r in rows]

    def entries(self) -> list[Entry]:
        """Every row."""
        return self._entries("")

    def lookup(self, path: bytes) -> Entry | None:
        """The row of ``path`` (found by its MD5 path hash, as clients do)."""
        found = self._entries("WHERE md5path_1 = ? AND md5path_2 = ?", md5_pair(path))
        return found[0] if found else None

    def listing(self, path: bytes) -> list[Entry]:
        """The rows whose parent is ``path``, by name."""
        return sorted(self._entries("WHERE parent_1 = ? AND parent_2 = ?", md5_pair(path)),
                      key=lambda e: e.name)

    def chunks(self, md5: tuple[int, int]) -> list[Chunk]:
        """The chunk rows of one file, by offset."""
        try:
            rows = self._db.execute("SELECT offset, size, hash FROM chunks WHERE md5path_1 = ? AND "
                                    "md5path_2 = ? ORDER BY offset", md5).fetchall()
        except sqlite3.Error as err:
            raise DatabaseError(f"cannot read table chunks ({err})") from None
        return [Chunk(r[0], r[1], r[2] or b"") for r in rows]

    def chunk_owners(self) -> set[tuple[int, int]]:
        """Path hashes that have chunk rows."""
        rows = self._db.execute("SELECT DISTINCT md5path_1, md5path_2 FROM chunks").fetchall()
        return {(r[0], r[1]) for r in rows}

    def references(self, table: str = "nested_catalogs") -> list[Reference]:
        """``nested_catalogs`` (or ``bind_mountpoints``) rows."""
        if table not in ("nested_catalogs", "bind_mountpoints"):
            raise ValueError(table)
        try:
            rows = self._db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
        except sqlite3.OperationalError as err:
            if table == "bind_mountpoints" and "no such table" in str(err):
                return []
            raise DatabaseError(f"cannot read table {table} ({err})") from None
        return [Reference(r[0] or b"", _text(r[1]), r[2] if len(r) > 2 else None) for r in rows]

    def statistics(self) -> dict[str, int]:
        """The ``statistics`` table."""
        rows = self._db.execute("SELECT counter, value FROM statistics").fetchall()
        return {_text(name): int(value or 0) for name, value in rows}

    def nested_for(self, path: bytes) -> Reference | None:
        """The nested catalog whose mountpoint is ``path`` or its deepest ancestor, if any."""
        best: Reference | None = None
        for ref in self.references():
            if (path == ref.path or path.startswith(ref.path + b"/")) and (
                    best is None or len(ref.path) > len(best.path)):
                best = ref
        return best
