"""File catalogs: SQLite databases in the CVMFS schema 2.5 (revision 7), written and edited.

A catalog lists directory entries by the MD5 of their full repository path (split into two
signed 64-bit integers), with their parent's, their content hash (raw 20 bytes), size, mode,
mtime, flags, name and symlink target; chunked files list their chunks in ``chunks``; nested
catalogs are listed with their hash and uncompressed size in ``nested_catalogs``; the
``statistics`` table holds the 24 ``self_*``/``subtree_*`` counters. See
``docs/cvmfs-native.md`` and the format notes for the rules every row follows.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

SCHEMA = "2.5"
SCHEMA_REVISION = 7
_SCHEMA_SQL = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))",
    "CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, "
    "parent_2 INTEGER, hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER, "
    "mtimens INTEGER, flags INTEGER, name TEXT, symlink TEXT, uid INTEGER, gid INTEGER, "
    "xattr BLOB, CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2))",
    "CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2)",
    "CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER, "
    "hash BLOB, CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size), "
    "FOREIGN KEY (md5path_1, md5path_2) REFERENCES catalog(md5path_1, md5path_2))",
    "CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER, "
    "CONSTRAINT pk_nested_catalogs PRIMARY KEY (path))",
    "CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER, "
    "CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path))",
    "CREATE TABLE statistics (counter TEXT, value INTEGER, "
    "CONSTRAINT pk_statistics PRIMARY KEY (counter))",
)

# Entry flags (cvmfs catalog_sql.h); hash algorithm bits 8-10 are 0 for SHA-1.
DIR, NESTED_MOUNTPOINT, FILE, LINK, SPECIAL, NESTED_ROOT, CHUNKED = 1, 2, 4, 8, 16, 32, 64
DIR_SIZE = 4096
DEFAULT_TTL = 240
_NULL_MD5 = (0, 0)


def md5path(path: bytes) -> tuple[int, int]:
    """The two signed 64-bit halves of MD5(path), as cvmfs binds them (little endian)."""
    first, second = struct.unpack("<qq", hashlib.md5(path).digest())  # noqa: S324 (format)
    return first, second


def parent_path(path: bytes) -> bytes:
    """``/a/b`` -> ``/a``; ``/a`` -> ``""``."""
    return path.rpartition(b"/")[0]


@dataclass
class Counters:
    """The per-catalog counters of ``statistics`` (one ``self_``/``subtree_`` pair each)."""

    regular: int = 0
    symlink: int = 0
    special: int = 0
    dir: int = 0
    nested: int = 0
    chunked: int = 0
    chunks: int = 0
    file_size: int = 0
    chunked_size: int = 0
    xattr: int = 0
    external: int = 0
    external_file_size: int = 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def items(self) -> Iterator[tuple[str, int]]:
        """(name, value) pairs in a fixed order."""
        for f in fields(self):
            yield f.name, getattr(self, f.name)


@dataclass(frozen=True, slots=True)
class Row:
    """One directory entry; ``path`` is its full repository path (``b""`` for the root)."""

    path: bytes
    mode: int
    flags: int
    size: int = 0
    mtime_ns: int = 0
    digest: bytes | None = None
    linkcount: int = 1
    group: int = 0
    symlink: bytes = b""
    uid: int = 0
    gid: int = 0

    def with_flags(self, flags: int) -> Row:
        """The same entry with other flags (transition point <-> nested root)."""
        return Row(self.path, self.mode, flags, self.size, self.mtime_ns, self.digest,
                   self.linkcount, self.group, self.symlink, self.uid, self.gid)

    def values(self, root_of_root: bool = False) -> tuple[object, ...]:
        """The ``catalog`` columns in table order."""
        p1, p2 = md5path(self.path)
        q1, q2 = _NULL_MD5 if root_of_root else md5path(parent_path(self.path))
        name = self.path.rpartition(b"/")[2]
        seconds, nanos = divmod(self.mtime_ns, 1_000_000_000)
        return (p1, p2, q1, q2, (self.group << 32) | self.linkcount, self.digest, self.size,
                self.mode, seconds, nanos, self.flags, name.decode(), self.symlink.decode(),
                self.uid, self.gid, None)


_INSERT = "INSERT OR REPLACE INTO catalog VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
_SELF_COUNTS = f"""SELECT
  coalesce(sum((flags & {FILE | LINK | SPECIAL}) = {FILE}), 0),
  coalesce(sum((flags & {LINK}) != 0), 0),
  coalesce(sum((flags & {SPECIAL}) != 0), 0),
  coalesce(sum((flags & {DIR}) != 0), 0),
  coalesce(sum((flags & {FILE | LINK | SPECIAL | CHUNKED}) = {FILE | CHUNKED}), 0),
  coalesce(sum(CASE WHEN (flags & {FILE | LINK | SPECIAL}) = {FILE} THEN size ELSE 0 END), 0),
  coalesce(sum(CASE WHEN (flags & {FILE | LINK | SPECIAL | CHUNKED}) = {FILE | CHUNKED}
               THEN size ELSE 0 END), 0),
  coalesce(sum(xattr IS NOT NULL), 0)
FROM catalog"""  # noqa: S608 (constants only)


class CatalogFile:
    """One catalog database on local disk, open for writing."""

    def __init__(self, path: Path, conn: sqlite3.Connection, is_root: bool) -> None:
        self.path = path
        self.conn = conn
        self.is_root = is_root

    @classmethod
    def create(cls, path: Path, root_prefix: bytes | None) -> CatalogFile:
        """A new empty catalog; ``root_prefix`` is None for the repository's root catalog."""
        conn = _connect(path)
        for statement in _SCHEMA_SQL:
            conn.execute(statement)
        props = [("schema", SCHEMA), ("schema_revision", str(SCHEMA_REVISION))]
        if root_prefix is not None:
            props.append(("root_prefix", root_prefix.decode()))
        conn.executemany("INSERT INTO properties VALUES (?, ?)", props)
        return cls(path, conn, root_prefix is None)

    @classmethod
    def open(cls, path: Path) -> CatalogFile:
        """An existing catalog (an inflated copy of a stored one)."""
        conn = _connect(path)
        row = conn.execute("SELECT value FROM properties WHERE key = 'root_prefix'").fetchone()
        return cls(path, conn, row is None)

    # -- entries --------------------------------------------------------------------------
    def add(self, rows: Iterable[Row]) -> None:
        """Insert (or replace) entries."""
        is_root = self.is_root
        self.conn.executemany(_INSERT, (r.values(is_root and r.path == b"") for r in rows))

    def add_chunks(self, path: bytes, chunks: Iterable[tuple[int, int, bytes]]) -> None:
        """The (offset, size, digest) chunks of a chunked file."""
        p1, p2 = md5path(path)
        self.conn.executemany("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?)",
                              ((p1, p2, off, size, digest) for off, size, digest in chunks))

    def remove(self, path: bytes) -> None:
        """Delete one entry (and its chunks)."""
        p1, p2 = md5path(path)
        self.conn.execute("DELETE FROM catalog WHERE md5path_1 = ? AND md5path_2 = ?", (p1, p2))
        self.conn.execute("DELETE FROM chunks WHERE md5path_1 = ? AND md5path_2 = ?", (p1, p2))

    def get(self, path: bytes) -> Row | None:
        """The entry at ``path``, or None."""
        p1, p2 = md5path(path)
        cur = self.conn.execute(
            "SELECT hardlinks, hash, size, mode, mtime, mtimens, flags, symlink, uid, gid "
            "FROM catalog WHERE md5path_1 = ? AND md5path_2 = ?", (p1, p2))
        found = cur.fetchone()
        if found is None:
            return None
        links, digest, size, mode, mtime, nanos, flags, symlink, uid, gid = found
        return Row(path, mode, flags, size, mtime * 1_000_000_000 + (nanos or 0), digest,
                   links & 0xFFFFFFFF, links >> 32, (symlink or "").encode(), uid, gid)

    def children(self, path: bytes) -> list[tuple[str, int, int]]:
        """(name, flags, mtime) of the entries directly below ``path``."""
        p1, p2 = md5path(path)
        return list(self.conn.execute(
            "SELECT name, flags, mtime FROM catalog WHERE parent_1 = ? AND parent_2 = ? "
            "ORDER BY name", (p1, p2)))

    def count_subdirs(self, path: bytes) -> int:
        """Directories directly below ``path``."""
        p1, p2 = md5path(path)
        (n,) = self.conn.execute(
            f"SELECT count(*) FROM catalog WHERE parent_1 = ? AND parent_2 = ? "  # noqa: S608
            f"AND flags & {DIR}",
            (p1, p2)).fetchone()
        return int(n)

    # -- nested catalogs --------------------------------------------------------------------
    def set_nested(self, path: bytes, hex_digest: str, size: int) -> None:
        """Register (or update) the nested catalog mounted at ``path``."""
        self.conn.execute("INSERT OR REPLACE INTO nested_catalogs VALUES (?, ?, ?)",
                          (path.decode(), hex_digest, size))

    def remove_nested(self, path: bytes) -> None:
        """Forget the nested catalog mounted at ``path``."""
        self.conn.execute("DELETE FROM nested_catalogs WHERE path = ?", (path.decode(),))

    def nested(self) -> list[tuple[str, str, int]]:
        """(path, hex hash, size) of every nested catalog listed here."""
        return list(self.conn.execute("SELECT path, sha1, size FROM nested_catalogs"))

    # -- counters and properties -------------------------------------------------------------
    def self_counters(self) -> Counters:
        """The ``self_*`` counters recomputed from the rows."""
        (regular, symlink, special, dirs, chunked, file_size, chunked_size,
         xattr) = self.conn.execute(_SELF_COUNTS).fetchone()
        (chunks,) = self.conn.execute("SELECT count(*) FROM chunks").fetchone()
        (nested,) = self.conn.execute("SELECT count(*) FROM nested_catalogs").fetchone()
        return Counters(regular=regular, symlink=symlink, special=special, dir=dirs,
                        nested=nested, chunked=chunked, chunks=chunks, file_size=file_size,
                        chunked_size=chunked_size, xattr=xattr)

    def stored_counters(self) -> tuple[Counters, Counters]:
        """The (self, subtree) counters as stored in ``statistics``."""
        own, sub = Counters(), Counters()
        for name, value in self.conn.execute("SELECT counter, value FROM statistics"):
            kind, _, counter = name.partition("_")
            target = own if kind == "self" else sub
            if hasattr(target, counter):
                setattr(target, counter, value)
        return own, sub

    def finish(self, *, revision: int, now: int, subtree: Counters,
               previous: str | None = None, ttl: int | None = None) -> Counters:
        """Write counters and properties, close the database; return self + subtree."""
        own = self.self_counters()
        stats = [(f"self_{k}", v) for k, v in own.items()]
        stats += [(f"subtree_{k}", v) for k, v in subtree.items()]
        conn = self.conn
        conn.executemany("INSERT OR REPLACE INTO statistics VALUES (?, ?)", stats)
        props = [("revision", str(revision)), ("last_modified", str(now))]
        if previous is not None:
            props.append(("previous_revision", previous))
        if ttl is not None:
            props.append(("TTL", str(ttl)))
        conn.executemany("INSERT OR REPLACE INTO properties VALUES (?, ?)", props)
        conn.commit()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        if free * 4 > pages:
            conn.execute("VACUUM")
        conn.close()
        return own + subtree

    def close(self) -> None:
        """Close without finishing (abandon the file)."""
        self.conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    return conn
