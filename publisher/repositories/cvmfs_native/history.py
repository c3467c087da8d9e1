"""The tag database (history, object ``...H``) and the reflog (``.cvmfsreflog``).

History (cvmfs ``history_sql.cc``, schema 1.0 revision 3): one ``generic-<time>`` tag per
published revision plus ``trunk`` (the current revision) and ``trunk-previous``; each tag names
a root catalog. Reflog (``reflog_sql.cc``, schema 1.0 revision 0): every root-of-something ever
stored (catalogs, certificates, histories, meta-info), for garbage collection and checks.
"""

from __future__ import annotations

import datetime
import sqlite3
from dataclasses import dataclass
from pathlib import Path

_HISTORY_SQL = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))",
    "CREATE TABLE tags (name TEXT, hash TEXT, revision INTEGER,   timestamp INTEGER, "
    "channel INTEGER,   description TEXT, size INTEGER,   branch TEXT, "
    "CONSTRAINT pk_tags PRIMARY KEY (name),   FOREIGN KEY (branch) REFERENCES branches (branch))",
    "CREATE TABLE recycle_bin (hash TEXT, flags INTEGER,   "
    "CONSTRAINT pk_hash PRIMARY KEY (hash))",
    "CREATE TABLE branches (branch TEXT, parent TEXT, initial_revision INTEGER,   "
    "CONSTRAINT pk_branch PRIMARY KEY (branch),   "
    "FOREIGN KEY (parent) REFERENCES branches (branch),   "
    "CHECK ((branch <> '') OR (parent IS NULL)),   CHECK ((branch = '') OR (parent IS NOT NULL)))",
    "INSERT INTO branches (branch, parent, initial_revision) VALUES ('', NULL, 0)",
)
_REFLOG_SQL = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))",
    "CREATE TABLE refs (hash TEXT, type INTEGER, timestamp INTEGER, "
    "CONSTRAINT pk_refs PRIMARY KEY (hash))",
)
TRUNK, TRUNK_PREVIOUS = "trunk", "trunk-previous"
AUTO_PREFIX = "generic-"
# Reflog reference types.
REF_CATALOG, REF_CERTIFICATE, REF_HISTORY, REF_METAINFO = 0, 1, 2, 3


@dataclass(frozen=True)
class Tag:
    """One row of ``tags``."""

    name: str
    root_hash: str
    revision: int
    timestamp: int
    description: str
    size: int


def _open(path: Path, create_sql: tuple[str, ...] | None, props: dict[str, str]
          ) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    if create_sql is not None:
        for statement in create_sql:
            conn.execute(statement)
    conn.executemany("INSERT OR REPLACE INTO properties VALUES (?, ?)", props.items())
    return conn


class History:
    """A tag database file being edited."""

    def __init__(self, path: Path, fqrn: str, *, create: bool) -> None:
        props = {"schema": "1.0", "schema_revision": "3", "fqrn": fqrn}
        self.path = path
        self.conn = _open(path, _HISTORY_SQL if create else None, props)

    def tags(self) -> list[Tag]:
        """Every tag, newest revision first."""
        return [Tag(*row) for row in self.conn.execute(
            "SELECT name, hash, revision, timestamp, description, size FROM tags "
            "ORDER BY revision DESC, name")]

    def get(self, name: str) -> Tag | None:
        """The tag called ``name``."""
        row = self.conn.execute(
            "SELECT name, hash, revision, timestamp, description, size FROM tags WHERE name = ?",
            (name,)).fetchone()
        return None if row is None else Tag(*row)

    def put(self, tag: Tag) -> None:
        """Insert or replace a tag (channel 0, trunk branch ``''``)."""
        self.conn.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, 0, ?, ?, '')",
                          (tag.name, tag.root_hash, tag.revision, tag.timestamp,
                           tag.description, tag.size))

    def remove(self, names: list[str]) -> None:
        """Delete tags by name."""
        self.conn.executemany("DELETE FROM tags WHERE name = ?", ((n,) for n in names))

    def record_revision(self, root_hash: str, size: int, revision: int, now: int) -> None:
        """Tag a new revision: an automatic ``generic-`` tag, ``trunk`` and ``trunk-previous``."""
        current = self.get(TRUNK)
        if current is not None:
            self.put(Tag(TRUNK_PREVIOUS, current.root_hash, current.revision, current.timestamp,
                         "default undo target", current.size))
        self.put(Tag(TRUNK, root_hash, revision, now, "current HEAD", size))
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        name = f"{AUTO_PREFIX}{stamp}"
        if self.get(name) is not None:
            name = f"{name}-{revision}"
        self.put(Tag(name, root_hash, revision, now, "published by userpub", size))

    def finish(self, previous: str | None) -> None:
        """Record the previous history object and close."""
        if previous:
            self.conn.execute("INSERT OR REPLACE INTO properties VALUES "
                              "('previous_revision', ?)", (previous,))
        self.conn.commit()
        self.conn.execute("VACUUM")
        self.conn.close()


class Reflog:
    """A reflog file being edited."""

    def __init__(self, path: Path, fqrn: str, *, create: bool) -> None:
        props = {"schema": "1.0", "schema_revision": "0", "fqrn": fqrn}
        self.conn = _open(path, _REFLOG_SQL if create else None, props)

    def add(self, refs: list[tuple[str, int]], now: int) -> None:
        """Record (hex hash, type) references."""
        self.conn.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?, ?)",
                              ((h, t, now) for h, t in refs))

    def remove(self, hashes: list[str]) -> None:
        """Forget references (objects deleted by garbage collection)."""
        self.conn.executemany("DELETE FROM refs WHERE hash = ?", ((h,) for h in hashes))

    def refs(self) -> list[tuple[str, int]]:
        """Every (hash, type)."""
        return list(self.conn.execute("SELECT hash, type FROM refs"))

    def finish(self) -> None:
        """Commit and close."""
        self.conn.commit()
        self.conn.close()
