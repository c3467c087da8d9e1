"""Writing a new revision: namespace catalogs, history, reflog, then the signed manifest.

The namespace above the CIDs is::

    /                       root catalog (tiny: the root, /<prefix>, /<stamps>)
    /<prefix>               nested catalog: one transition directory per CID or group
    /<prefix>/<group>       nested catalog per group: one transition directory per CID
    /<prefix>/<cid>         nested catalog per CID (written while its tarball streams in)
    /<stamps>               nested catalog: stamp files <cid> or <group>/<cid>

Catalogs that change are edited incrementally: the stored catalog is inflated into
``data/txn``, rows are changed, ``self_*`` counters are recomputed from the rows and
``subtree_*`` counters adjusted by the differences of the changed children; then it is stored
again, bottom-up, so every parent lists its children's new hashes. Everything is stored before
:meth:`Layout.install` switches the manifest.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from publisher.repositories.cvmfs_native.catalog import (
    DEFAULT_TTL,
    DIR,
    DIR_SIZE,
    FILE,
    NESTED_MOUNTPOINT,
    NESTED_ROOT,
    CatalogFile,
    Counters,
    Row,
)
from publisher.repositories.cvmfs_native.history import (
    REF_CATALOG,
    REF_CERTIFICATE,
    REF_HISTORY,
    REF_METAINFO,
    History,
    Reflog,
)
from publisher.repositories.cvmfs_native.keys import Keys
from publisher.repositories.cvmfs_native.layout import Layout
from publisher.repositories.cvmfs_native.manifest import Manifest, sign_manifest
from publisher.repositories.cvmfs_native.objects import (
    CATALOG,
    CERTIFICATE,
    HISTORY,
    METAINFO,
    ObjectStore,
    object_digest,
)
from publisher.repositories.cvmfs_native.tree import MARKER, BuiltCatalog

NS = 1_000_000_000


@dataclass
class Changes:
    """What one transaction changes in the namespace."""

    added: dict[str, BuiltCatalog] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    stamped: dict[str, str] = field(default_factory=dict)  # cid -> who
    unstamped: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.stamped or self.unstamped)


@dataclass
class Identity:
    """Who the repository is and how its entries are owned."""

    fqrn: str
    prefix: str
    stamps: str
    uid: int
    gid: int
    metainfo: dict[str, object]


class _Edit:
    """One catalog being edited, with what its parent needs to know."""

    def __init__(self, file: CatalogFile, path: bytes, old_hash: str | None,
                 old_totals: Counters, subtree: Counters) -> None:
        self.file = file
        self.path = path
        self.old_hash = old_hash
        self.old_totals = old_totals
        self.subtree = subtree
        self.changed = False

    def attach(self, built: BuiltCatalog, old_totals: Counters | None) -> None:
        """Mount (or re-mount) a child catalog below this one."""
        self.file.add([built.root.with_flags(DIR | NESTED_MOUNTPOINT)])
        self.file.set_nested(built.root.path, built.digest, built.size)
        self.subtree = self.subtree + built.totals - (old_totals or Counters())
        self.changed = True

    def detach(self, path: bytes, old_totals: Counters) -> None:
        """Unmount a child catalog."""
        self.file.remove(path)
        self.file.remove_nested(path)
        self.subtree = self.subtree - old_totals
        self.changed = True


class RevisionWriter:
    """Builds and installs the next revision of one repository."""

    def __init__(self, layout: Layout, store: ObjectStore, keys: Keys, who: Identity,
                 temp: Callable[[], Path], *, durable: bool) -> None:
        self.layout = layout
        self.store = store
        self.keys = keys
        self.who = who
        self.temp = temp
        self.durable = durable
        self.written: list[str] = []

    # -- catalogs -------------------------------------------------------------------------------
    def open_catalog(self, path: bytes, digest: str) -> _Edit:
        """Inflate a stored catalog for editing."""
        local = self.temp()
        local.write_bytes(self.store.get(digest, CATALOG))
        file = CatalogFile.open(local)
        own, sub = file.stored_counters()
        return _Edit(file, path, digest, own + sub, sub)

    def new_catalog(self, path: bytes, now: int) -> _Edit:
        """A new nested catalog for a namespace directory, with its marker file."""
        file = CatalogFile.create(self.temp(), root_prefix=path)
        marker = self.store.put_data(b"")
        file.add([self.dir_row(path, DIR | NESTED_ROOT, 2, now),
                  Row(path + b"/" + MARKER, stat.S_IFREG | 0o644, FILE, 0, now * NS,
                      marker.digest, uid=self.who.uid, gid=self.who.gid)])
        return _Edit(file, path, None, Counters(), Counters())

    def child_totals(self, digest: str) -> Counters:
        """self + subtree counters of a stored catalog."""
        local = self.temp()
        try:
            local.write_bytes(self.store.get(digest, CATALOG))
            file = CatalogFile.open(local)
            own, sub = file.stored_counters()
            file.close()
        finally:
            local.unlink(missing_ok=True)
        return own + sub

    def finish(self, edit: _Edit, revision: int, now: int, *, is_root: bool = False,
               previous: str | None = None) -> BuiltCatalog:
        """Refresh the catalog's root row, write counters, store it (reuse it if unchanged)."""
        path = edit.path
        old = edit.file.get(path)
        assert old is not None
        if not edit.changed and edit.old_hash is not None and not is_root:
            edit.file.close()
            size = edit.file.path.stat().st_size
            edit.file.path.unlink(missing_ok=True)
            return BuiltCatalog(edit.old_hash, size, edit.old_totals, old, ())
        links = 2 + edit.file.count_subdirs(path)
        flags = DIR if is_root else DIR | NESTED_ROOT
        mtime = now * NS if edit.changed else old.mtime_ns
        root = Row(path, old.mode, flags, DIR_SIZE, mtime, linkcount=links, uid=old.uid,
                   gid=old.gid)
        edit.file.add([root])
        totals = edit.file.finish(revision=revision, now=now, subtree=edit.subtree,
                                  previous=previous or edit.old_hash,
                                  ttl=DEFAULT_TTL if is_root else None)
        try:
            stored = self.store.put_file(edit.file.path, CATALOG)
            size = edit.file.path.stat().st_size
        finally:
            edit.file.path.unlink(missing_ok=True)
        self.written.append(stored.hex)
        return BuiltCatalog(stored.hex, size, totals, root, (stored.hex,))

    def dir_row(self, path: bytes, flags: int, links: int, now: int) -> Row:
        return Row(path, stat.S_IFDIR | 0o755, flags, DIR_SIZE, now * NS, linkcount=links,
                   uid=self.who.uid, gid=self.who.gid)

    # -- the namespace ----------------------------------------------------------------------------
    def namespace(self, base: Manifest | None, changes: Changes, revision: int, now: int
                  ) -> BuiltCatalog:
        """Apply ``changes`` to the namespace catalogs; return the new root catalog."""
        prefix = f"/{self.who.prefix}".encode()
        stamps = f"/{self.who.stamps}".encode()
        top_nested: dict[bytes, str] = {}
        if base is not None:
            root_local = self.temp()
            root_local.write_bytes(self.store.get(base.root_catalog, CATALOG))
            root_file = CatalogFile.open(root_local)
            top_nested = {p.encode(): h for p, h, _ in root_file.nested()}
            root_file.close()
            root_local.unlink()
        sw = (self.open_catalog(prefix, top_nested[prefix]) if prefix in top_nested
              else self.new_catalog(prefix, now))
        ts = (self.open_catalog(stamps, top_nested[stamps]) if stamps in top_nested
              else self.new_catalog(stamps, now))
        self._apply_cids(sw, changes, revision, now)
        StampEditor(self, ts, now).apply(changes)
        sw_built = self.finish(sw, revision, now)
        ts_built = self.finish(ts, revision, now)
        root = _Edit(CatalogFile.create(self.temp(), root_prefix=None), b"", None, Counters(),
                     Counters())
        root.file.add([self.dir_row(b"", DIR, 4, now)])
        root.attach(sw_built, None)
        root.attach(ts_built, None)
        return self.finish(root, revision, now, is_root=True,
                           previous=base.root_catalog if base else None)

    def _apply_cids(self, sw: _Edit, changes: Changes, revision: int, now: int) -> None:
        nested = {p.encode(): h for p, h, _ in sw.file.nested()}
        groups: dict[str, list[str]] = {}
        for cid in sorted(set(changes.added) | changes.removed):
            if "/" in cid:
                groups.setdefault(cid.partition("/")[0], []).append(cid)
                continue
            self._apply_one(sw, nested, cid, changes)
        for group, cids in sorted(groups.items()):
            gpath = sw.path + b"/" + group.encode()
            old = nested.get(gpath)
            edit = self.open_catalog(gpath, old) if old else self.new_catalog(gpath, now)
            old_totals = edit.old_totals
            group_nested = {p.encode(): h for p, h, _ in edit.file.nested()}
            for cid in cids:
                self._apply_one(edit, group_nested, cid, changes)
            if not edit.file.nested():
                edit.file.close()
                edit.file.path.unlink(missing_ok=True)
                if old:
                    sw.detach(gpath, old_totals)
                continue
            if edit.changed:
                sw.attach(self.finish(edit, revision, now), old_totals if old else None)
            else:
                edit.file.close()
                edit.file.path.unlink(missing_ok=True)

    def _apply_one(self, parent: _Edit, nested: dict[bytes, str], cid: str,
                   changes: Changes) -> None:
        path = f"/{self.who.prefix}/{cid}".encode()
        old = nested.get(path)
        if cid in changes.removed and old is not None:
            parent.detach(path, self.child_totals(old))
            nested.pop(path)
            old = None
        built = changes.added.get(cid)
        if built is not None and old is None:
            parent.attach(built, None)
            nested[path] = built.digest

    # -- history, reflog, manifest ----------------------------------------------------------------
    def write(self, base: Manifest | None, changes: Changes, now: int,
              prune: Callable[[History], None] | None = None,
              drop_refs: list[str] | None = None) -> Manifest:
        """Store the next revision's objects, then switch the manifest to it."""
        revision = (base.revision if base else 0) + 1
        root = self.namespace(base, changes, revision, now)
        self.written += [h for built in changes.added.values() for h in built.written]
        return self.seal(base, root.digest, root.size, revision, now, prune=prune,
                         drop_refs=drop_refs)

    def seal(self, base: Manifest | None, root_digest: str, root_size: int, revision: int,
             now: int, *, prune: Callable[[History], None] | None = None,
             drop_refs: list[str] | None = None) -> Manifest:
        """History, certificate, meta-info, reflog (listing ``written``) and the signed manifest
        of a revision whose catalogs are stored; then switch to it."""
        history_local = self.temp()
        if base is not None and base.history:
            history_local.write_bytes(self.store.get(base.history, HISTORY))
        history = History(history_local, self.who.fqrn,
                          create=base is None or not base.history)
        history.record_revision(root_digest, root_size, revision, now)
        if prune is not None:
            prune(history)
        history.finish(base.history if base else None)
        try:
            history_obj = self.store.put_file(history_local, HISTORY)
        finally:
            history_local.unlink(missing_ok=True)
        cert = self.store.put_data(self.keys.certificate_pem, CERTIFICATE)
        meta = self.store.put_data(
            (json.dumps(self.who.metainfo, indent=2, sort_keys=True) + "\n").encode(), METAINFO)
        reflog_local = self.temp()
        if self.layout.reflog.exists():
            reflog_local.write_bytes(self.layout.reflog.read_bytes())
        reflog = Reflog(reflog_local, self.who.fqrn, create=not self.layout.reflog.exists())
        if drop_refs:
            reflog.remove(drop_refs)
        refs = [(h, REF_CATALOG) for h in self.written]
        refs += [(history_obj.hex, REF_HISTORY), (cert.hex, REF_CERTIFICATE),
                 (meta.hex, REF_METAINFO)]
        reflog.add(refs, now)
        reflog.finish()
        manifest = Manifest(root_catalog=root_digest, catalog_size=root_size, ttl=DEFAULT_TTL,
                            revision=revision, fqrn=self.who.fqrn, certificate=cert.hex,
                            history=history_obj.hex, timestamp=now, metainfo=meta.hex,
                            reflog=object_digest(reflog_local.read_bytes()).hex())
        self.layout.install(revision, sign_manifest(manifest, self.keys.repository_key),
                            reflog_local, durable=self.durable)
        return manifest


class StampEditor:
    """Stamp files in the ``/<stamps>`` catalog: set (mtime = now), remove, tidy groups."""

    def __init__(self, writer: RevisionWriter, edit: _Edit, now: int) -> None:
        self.writer = writer
        self.edit = edit
        self.now = now

    def apply(self, changes: Changes) -> None:
        """Write every stamp change."""
        file, top, who = self.edit.file, self.edit.path, self.writer.who
        touched_groups: set[bytes] = set()
        for cid in sorted(changes.unstamped):
            path = top + b"/" + cid.encode()
            if file.get(path) is not None:
                file.remove(path)
                self.edit.changed = True
                if "/" in cid:
                    touched_groups.add(top + b"/" + cid.partition("/")[0].encode())
        for cid, submitter in sorted(changes.stamped.items()):
            path = top + b"/" + cid.encode()
            if "/" in cid:
                gpath = top + b"/" + cid.partition("/")[0].encode()
                touched_groups.add(gpath)
                if file.get(gpath) is None:
                    file.add([self.writer.dir_row(gpath, DIR, 2, self.now)])
            content = f"{submitter}\n".encode()
            obj = self.writer.store.put_data(content)
            file.add([Row(path, stat.S_IFREG | 0o644, FILE, len(content), self.now * NS,
                          obj.digest, uid=who.uid, gid=who.gid)])
            self.edit.changed = True
        for gpath in touched_groups:
            row = file.get(gpath)
            if row is None:
                continue
            if not file.children(gpath):
                file.remove(gpath)
            else:
                file.add([Row(gpath, row.mode, DIR, DIR_SIZE, self.now * NS, linkcount=2,
                              uid=row.uid, gid=row.gid)])
