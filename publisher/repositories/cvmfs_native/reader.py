"""The catalog view of a cvmfs-native repository: answers from the *published* catalogs.

A CID is present when the published revision lists it, so ``PRESENT`` means what a client
sees. CIDs live at ``/<prefix>/<cid>`` (each its own nested catalog; a group directory
``/<prefix>/<group>`` is a nested catalog of its CIDs); stamps are regular files
``/<stamps>/<cid>`` whose mtime is the access time and whose content names who stamped.
A CID's publication time is the mtime of its directory.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from publisher.repositories.cvmfs_native.catalog import DIR, FILE, LINK, md5path
from publisher.repositories.cvmfs_native.layout import Layout
from publisher.repositories.cvmfs_native.manifest import Manifest
from publisher.repositories.cvmfs_native.objects import CATALOG, ObjectStore

PUBLISHER_RECORD = b".publisher"
_NS = 1_000_000_000


class _Loaded:
    """An inflated catalog, opened read-only in memory, with its nested-catalog index."""

    def __init__(self, data: bytes) -> None:
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.conn.deserialize(data)
        self.nested = {p.encode(): h for p, h in self.conn.execute(
            "SELECT path, sha1 FROM nested_catalogs")}

    def row(self, path: bytes) -> tuple[int, int, int, int] | None:
        """(flags, mtime_ns, size, linkcount) of the entry at ``path``."""
        p1, p2 = md5path(path)
        found = self.conn.execute(
            "SELECT flags, mtime, mtimens, size, hardlinks FROM catalog "
            "WHERE md5path_1 = ? AND md5path_2 = ?", (p1, p2)).fetchone()
        if found is None:
            return None
        flags, mtime, nanos, size, links = found
        return flags, mtime * _NS + (nanos or 0), size, links & 0xFFFFFFFF

    def children(self, path: bytes) -> list[tuple[bytes, int]]:
        """(name, flags) below ``path``."""
        p1, p2 = md5path(path)
        return [(name.encode(), flags) for name, flags in self.conn.execute(
            "SELECT name, flags FROM catalog WHERE parent_1 = ? AND parent_2 = ? ORDER BY name",
            (p1, p2))]

    def file_bytes(self) -> int:
        """``self_file_size + subtree_file_size``."""
        values = dict(self.conn.execute(
            "SELECT counter, value FROM statistics WHERE counter IN "
            "('self_file_size', 'subtree_file_size')").fetchall())
        return int(values.get("self_file_size", 0)) + int(values.get("subtree_file_size", 0))


class NativeReader:
    """Read-only view of a cvmfs-native repository directory."""

    def __init__(self, name: str, root: Path, prefix: str, stamps: str, mount: str,
                 cache_size: int = 32, *, replica: bool = False,
                 staleness: Callable[[], float | None] | None = None) -> None:
        self.name = name
        self.replica = replica
        self._staleness = staleness
        self.root = root
        self.prefix = prefix
        self.stamps_name = stamps
        self.mount = mount.rstrip("/")
        self.layout = Layout(root)
        self.store = ObjectStore(root)
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, _Loaded] = OrderedDict()
        self._cache_size = cache_size
        self._manifest_key: tuple[int, int, int] | None = None
        self._manifest: Manifest | None = None
        self._is_cid: dict[str, bool] = {}

    def staleness(self) -> float | None:
        """A replica's age as ``staleness`` reports it; None for the stratum 0 this host
        writes (the origin itself) or a replica nobody here refreshes."""
        return self._staleness() if self._staleness is not None else None

    def unreadable(self) -> str | None:
        """Why the repository cannot be read (its directory is missing), or None.

        A repository without a published revision yet is readable: it holds nothing. A
        replica without one is not: it has not been pulled yet, and holds what it lacks.
        """
        if not self.root.is_dir():
            return f"{self.root} is not a directory"
        if self.replica and self.manifest() is None:
            return f"the replica {self.root} has not been pulled yet (no .cvmfspublished)"
        return None

    # -- plumbing -----------------------------------------------------------------------------
    def manifest(self) -> Manifest | None:
        """The published manifest (re-read when the file changes)."""
        with self._lock:
            try:
                st = os.stat(self.layout.manifest)
            except FileNotFoundError:
                self._manifest_key = self._manifest = None
                return None
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._manifest_key:
                self._manifest = self.layout.read_manifest()
                self._manifest_key = key
            return self._manifest

    def catalog(self, hex_digest: str) -> _Loaded:
        """An inflated catalog object (cached; catalogs are immutable)."""
        with self._lock:
            loaded = self._cache.get(hex_digest)
            if loaded is None:
                loaded = _Loaded(self.store.get(hex_digest, CATALOG))
                self._cache[hex_digest] = loaded
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)[1].conn.close()
            else:
                self._cache.move_to_end(hex_digest)
            return loaded

    def catalog_of(self, path: bytes, *, into: bool = False) -> str | None:
        """The hash of the catalog holding ``path`` (the nested one at ``path`` if ``into``)."""
        manifest = self.manifest()
        if manifest is None:
            return None
        current = manifest.root_catalog
        parts = path.split(b"/")[1:]
        depth = 0
        while True:
            nested = self.catalog(current).nested
            found = None
            for i in range(depth + 1, len(parts) + (1 if into else 0)):
                candidate = b"/" + b"/".join(parts[:i])
                if candidate in nested:
                    found, depth = nested[candidate], i
                    break
            if found is None:
                return current
            current = found

    def entry(self, path: bytes) -> tuple[int, int, int, int] | None:
        """(flags, mtime_ns, size, linkcount) of ``path`` in the published revision."""
        try:
            with self._lock:
                digest = self.catalog_of(path)
                return None if digest is None else self.catalog(digest).row(path)
        except FileNotFoundError:  # collected meanwhile: the manifest changed under us
            return None

    def cid_path(self, cid: str) -> bytes:
        """``/<prefix>/<cid>``."""
        return f"/{self.prefix}/{cid}".encode()

    def stamp_path(self, cid: str) -> bytes:
        """``/<stamps>/<cid>``."""
        return f"/{self.stamps_name}/{cid}".encode()

    def _holds_cid(self, path: bytes) -> bool:
        """True when the nested catalog at ``path`` is a CID's (not a group's)."""
        with self._lock:
            digest = self.catalog_of(path, into=True)
            if digest is None:
                return False
            known = self._is_cid.get(digest)
            if known is None:
                known = self.catalog(digest).row(path + b"/" + PUBLISHER_RECORD) is not None
                if len(self._is_cid) > 100_000:
                    self._is_cid.clear()
                self._is_cid[digest] = known
            return known

    # -- RepositoryReader ---------------------------------------------------------------------
    def contains(self, cid: str) -> bool:
        """True when ``cid`` is published in the current revision."""
        path = self.cid_path(cid)
        found = self.entry(path)
        if found is None or not found[0] & DIR:
            return False
        try:
            return "/" in cid or self._holds_cid(path)
        except FileNotFoundError:
            return False

    def published_at(self, cid: str) -> float | None:
        """The mtime of the CID's directory (set when it was published)."""
        if not self.contains(cid):
            return None
        found = self.entry(self.cid_path(cid))
        return None if found is None else found[1] / _NS

    def stamped_at(self, cid: str) -> float | None:
        """The mtime of ``/<stamps>/<cid>``, or None."""
        found = self.entry(self.stamp_path(cid))
        if found is None or (found[0] & (FILE | LINK)) != FILE:
            return None
        return found[1] / _NS

    def cids(self) -> Iterator[str]:
        """Every published CID (``x`` or ``group/x``)."""
        top = f"/{self.prefix}".encode()
        for name, path in self._nested_below(top):
            if self._holds_cid(path):
                yield name
                continue
            for child, _ in self._nested_below(path):
                yield f"{name}/{child}"

    def _nested_below(self, path: bytes) -> list[tuple[str, bytes]]:
        with self._lock:
            digest = self.catalog_of(path, into=True)
            if digest is None:
                return []
            nested = self.catalog(digest).nested
            out = []
            for mount in sorted(nested):
                parent, _, name = mount.rpartition(b"/")
                if parent == path and not name.startswith(b"."):
                    out.append((name.decode(), mount))
            return out

    def stamps(self) -> Iterator[str]:
        """Every CID that has a stamp."""
        top = f"/{self.stamps_name}".encode()
        with self._lock:
            digest = self.catalog_of(top, into=True)
            if digest is None:
                return
            cat = self.catalog(digest)
            names: list[str] = []
            for name, flags in cat.children(top):
                if name.startswith(b"."):
                    continue
                if flags & DIR:
                    names.extend(f"{name.decode()}/{child.decode()}"
                                 for child, f in cat.children(top + b"/" + name)
                                 if not f & DIR and not child.startswith(b"."))
                elif (flags & (FILE | LINK)) == FILE:
                    names.append(name.decode())
        yield from names

    def visible_path(self, cid: str) -> str:
        """``<mount>/<prefix>/<cid>``."""
        return f"{self.mount}/{self.prefix}/{cid}"

    def size_of(self, cid: str) -> int:
        """Bytes of regular files in the CID (its catalogs' file-size counters)."""
        path = self.cid_path(cid)
        try:
            with self._lock:
                if not self.contains(cid):
                    return 0
                digest = self.catalog_of(path, into=True)
                return 0 if digest is None else self.catalog(digest).file_bytes()
        except FileNotFoundError:
            return 0
