"""``userpub recompress``: bring a repository written in another compression to CernVM-FS's.

Repositories written before issue 20 hold zlib streams made by ISA-L, which genuine stratum 1s
and ``cvmfs_fsck`` reject (:mod:`.compression`). Their objects are re-compressed into new
objects (new names) and the current revision is rewritten into a new one that names them:

1. Without the writer lock (the publisher keeps publishing): every file and chunk object the
   current revision reaches is inflated and stored again as CernVM-FS compresses it, by worker
   processes (the content index remembers them; temporary files go to ``.userpub/recompress``,
   where the publisher's clean-ups do not look; one ``recompress`` at a time).
2. Under the lock: the catalogs of the then current revision are rewritten bottom-up (object
   hashes, nested catalog hashes; a catalog that changes takes the new revision number), anything
   phase 1 did not cover is re-compressed on the spot, and the revision is sealed and switched as
   any publish is (history, certificate, meta-info, reflog, signed manifest last).

Nothing is deleted: the old revision stays ``trunk-previous`` and is tagged again as an
automatic tag of *now*, so garbage collection keeps it (and all its objects, none of which the
new revision shares) for ``gc_keep_hours`` from now, as it keeps any recently published
revision: readers still on it keep working. A crash at any point leaves the old or the new
revision, each complete. Running it again finds nothing to do.
"""

from __future__ import annotations

import datetime
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from publisher.repositories.cvmfs_native.catalog import CatalogFile
from publisher.repositories.cvmfs_native.compression import compress, decompress, is_canonical
from publisher.repositories.cvmfs_native.history import AUTO_PREFIX, History, Tag
from publisher.repositories.cvmfs_native.manifest import Manifest
from publisher.repositories.cvmfs_native.objects import (
    CATALOG,
    CERTIFICATE,
    HISTORY,
    METAINFO,
    PARTIAL,
    ObjectStore,
    StoredObject,
    worker_init,
)
from publisher.repositories.cvmfs_native.publish import RevisionWriter
from userpub.fsutil import remove_tree

if TYPE_CHECKING:
    from publisher.repositories.cvmfs_native.repository import NativeRepository

log = logging.getLogger("userpub.repository.cvmfs_native")

ObjectName = tuple[str, str]  # (hex digest, suffix)
_BATCH_BYTES = 8 << 20
_BATCH_COUNT = 64


@dataclass
class RecompressResult:
    """What :func:`recompress` did."""

    revision: int | None = None  # the new revision; None when there was nothing to do
    objects: int = 0  # file and chunk objects the revision reaches
    rewritten: int = 0  # of which were stored again under a new name
    catalogs: int = 0  # catalogs the revision reaches
    rewritten_catalogs: int = 0
    seconds: float = 0.0

    def summary(self, name: str) -> str:
        """One line for the operator."""
        if self.revision is None:
            return (f"{name}: already stored as CernVM-FS compresses ({self.objects} objects and "
                    f"{self.catalogs} catalogs checked in {self.seconds:.1f} s); nothing to do")
        return (f"{name}: published revision {self.revision}: {self.rewritten} of "
                f"{self.objects} objects and {self.rewritten_catalogs} of {self.catalogs} "
                f"catalogs stored again in {self.seconds:.1f} s; the previous revision and its "
                "objects stay until garbage collection retires them")


@dataclass
class Reached:
    """The objects of one revision: file contents and chunks, and catalogs."""

    objects: set[ObjectName] = field(default_factory=set)
    catalogs: set[str] = field(default_factory=set)


def reached(store: ObjectStore, root_catalog: str, *, missing_ok: bool = False) -> Reached:
    """Every catalog, file and chunk object of the revision with this root catalog.

    ``missing_ok``: skip catalogs deleted meanwhile (a walk without the writer lock).
    """
    walk = Reached()
    stack = [root_catalog]
    while stack:
        digest = stack.pop()
        if digest in walk.catalogs:
            continue
        walk.catalogs.add(digest)
        try:
            content = store.get(digest, CATALOG)
        except FileNotFoundError:
            if missing_ok:
                continue
            raise
        conn = sqlite3.connect(":memory:")
        try:
            conn.deserialize(content)
            walk.objects.update((bytes(h).hex(), "") for (h,) in conn.execute(
                "SELECT hash FROM catalog WHERE hash IS NOT NULL"))
            walk.objects.update((bytes(h).hex(), PARTIAL) for (h,) in conn.execute(
                "SELECT hash FROM chunks"))
            stack.extend(h for (h,) in conn.execute("SELECT sha1 FROM nested_catalogs"))
        finally:
            conn.close()
    return walk


def _canonical_batch(root: str, txn: str, names: list[ObjectName]
                     ) -> list[tuple[ObjectName, bytes, int]]:
    """Worker side of phase 1: each object's content stored as CernVM-FS compresses it."""
    store = ObjectStore(Path(root), Path(txn))
    found: list[tuple[ObjectName, bytes]] = []
    for name in names:
        try:
            found.append((name, store.get(*name)))
        except FileNotFoundError:  # collected meanwhile (no lock here): phase 2 sees the truth
            continue
    try:
        stored = store.put_many([(content, name[1]) for name, content in found])
        return [(name, o.digest, o.stored_size)
                for (name, _), o in zip(found, stored, strict=True)]
    finally:
        store.close_index()


def canonical_objects(store: ObjectStore, names: set[ObjectName], processes: int, txn: Path
                      ) -> dict[ObjectName, StoredObject]:
    """Store the content of every named object as CernVM-FS compresses it (phase 1)."""
    batches: list[list[ObjectName]] = [[]]
    size = 0
    for name in sorted(names):
        try:
            size += store.path(*name).stat().st_size
        except FileNotFoundError:
            continue  # gone since the walk (a removal and gc): phase 2 will not need it
        batches[-1].append(name)
        if size >= _BATCH_BYTES or len(batches[-1]) >= _BATCH_COUNT:
            batches.append([])
            size = 0
    done: dict[ObjectName, StoredObject] = {}
    root, temp = str(store.root), str(txn)
    if processes <= 0:
        results = [_canonical_batch(root, temp, b) for b in batches if b]
    else:
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn"),
                                 initializer=worker_init, initargs=(os.getpid(),)) as pool:
            results = list(pool.map(_canonical_batch, [root] * len(batches),
                                    [temp] * len(batches), batches))
    for batch in results:
        for name, digest, stored_size in batch:
            done[name] = StoredObject(digest, stored_size, new=digest.hex() != name[0])
    return done


class _Rewriter:
    """Phase 2: catalogs rewritten bottom-up to name the re-compressed objects."""

    def __init__(self, store: ObjectStore, writer: RevisionWriter,
                 done: dict[ObjectName, StoredObject], revision: int, now: int) -> None:
        self.store = store
        self.writer = writer
        self.done = done
        self.revision = revision
        self.now = now
        self.other_compression: set[str] = set()  # catalogs not stored as CernVM-FS does
        self.catalogs = 0
        self.objects: set[ObjectName] = set()
        self.rewritten: set[ObjectName] = set()
        self._memo: dict[str, tuple[str, int]] = {}

    def object(self, name: ObjectName) -> bytes:
        """The digest of the object's content as CernVM-FS stores it."""
        self.objects.add(name)
        known = self.done.get(name)
        if known is None or not self.store.present(known.digest, name[1], known.stored_size):
            known = self.store.put_data(self.store.get(*name), name[1])
            self.done[name] = known
        if known.digest.hex() != name[0]:
            self.rewritten.add(name)
        return known.digest

    def catalog(self, digest: str, *, is_root: bool = False) -> tuple[str, int]:
        """(hash, size) of the catalog rewritten (the same when nothing changes)."""
        if digest in self._memo:
            return self._memo[digest]
        stored = self.store.path(digest, CATALOG).read_bytes()
        content = decompress(stored)
        local = self.writer.temp()
        local.write_bytes(content)
        try:
            file = CatalogFile.open(local)
            conn = file.conn
            changed = is_root
            for path, child, _ in file.nested():
                new, size = self.catalog(child)
                if new != child:
                    conn.execute("UPDATE nested_catalogs SET sha1 = ?, size = ? WHERE path = ?",
                                 (new, size, path))
                    changed = True
            changed |= self._rows(conn, "catalog", "")
            changed |= self._rows(conn, "chunks", PARTIAL)
            if changed:
                conn.executemany("INSERT OR REPLACE INTO properties VALUES (?, ?)", [
                    ("revision", str(self.revision)), ("last_modified", str(self.now)),
                    ("previous_revision", digest)])
            conn.commit()
            conn.close()
            if changed:
                result, size = self.store.put_file(local, CATALOG), local.stat().st_size
            elif digest in self.other_compression:
                result, size = self.store.put(compress(content), CATALOG), len(content)
            else:
                self._memo[digest] = (digest, len(content))
                return self._memo[digest]
        finally:
            local.unlink(missing_ok=True)
        self.catalogs += 1
        self.writer.written.append(result.hex)
        self._memo[digest] = (result.hex, size)
        return self._memo[digest]

    def _rows(self, conn: sqlite3.Connection, table: str, suffix: str) -> bool:
        changed = False
        key = "md5path_1, md5path_2" + (", offset" if table == "chunks" else "")
        rows = conn.execute(f"SELECT {key}, hash FROM {table} "  # noqa: S608 (constants)
                            "WHERE hash IS NOT NULL").fetchall()
        where = " AND ".join(f"{k.strip()} = ?" for k in key.split(","))
        for *ids, blob in rows:
            new = self.object((bytes(blob).hex(), suffix))
            if new != bytes(blob):
                conn.execute(f"UPDATE {table} SET hash = ? WHERE {where}",  # noqa: S608
                             (new, *ids))
                changed = True
        return changed


def recompress(repo: NativeRepository, processes: int = 2) -> RecompressResult:
    """Rewrite the current revision of ``repo`` into one stored as CernVM-FS stores it."""
    repo.check_compressor()
    repo.layout.work.mkdir(parents=True, exist_ok=True)
    with FileLock(repo.layout.work / "recompress.lock"):
        temp = repo.layout.work / "recompress"
        if temp.exists():
            remove_tree(temp)  # what a killed run left
        temp.mkdir()
        try:
            return _recompress(repo, processes, temp)
        finally:
            remove_tree(temp)


def _recompress(repo: NativeRepository, processes: int, temp: Path) -> RecompressResult:
    start = time.monotonic()
    repo.store.index(create=True)
    first = repo.manifest()
    done: dict[ObjectName, StoredObject] = {}
    if first is not None:
        names = reached(repo.store, first.root_catalog, missing_ok=True).objects
        log.info("%s: re-compressing %d objects", repo.name, len(names))
        done = canonical_objects(repo.store, names, processes, temp)
        log.info("%s: %d objects stored again; rewriting the catalogs", repo.name,
                 sum(o.new for o in done.values()))
    with repo.locked():
        repo.store.clear_txn()  # no other writer now: what a killed writer left
        repo.initialize()
        base = repo.manifest()
        assert base is not None  # initialize() publishes a first revision
        now = int(time.time())
        writer = repo.writer()
        rewriter = _Rewriter(repo.store, writer, done, base.revision + 1, now)
        walk = reached(repo.store, base.root_catalog)
        for name in sorted(walk.objects):
            rewriter.object(name)  # what phase 1 missed (published since) is done now
        rewriter.other_compression = {d for d in walk.catalogs
                                      if not _canonical(repo.store, d, CATALOG)}
        letters = [(base.certificate, CERTIFICATE), (base.history, HISTORY),
                   (base.metainfo, METAINFO)]
        result = RecompressResult(objects=len(walk.objects), catalogs=len(walk.catalogs))
        if not (rewriter.rewritten or rewriter.other_compression
                or not all(_canonical(repo.store, d, s) for d, s in letters if d)):
            result.seconds = time.monotonic() - start
            log.info("%s", result.summary(repo.name))
            return result
        root, size = rewriter.catalog(base.root_catalog, is_root=True)
        manifest = writer.seal(base, root, size, base.revision + 1, now,
                               prune=keep_superseded(base, now))
    result.revision = manifest.revision
    result.rewritten = len(rewriter.rewritten)
    result.rewritten_catalogs = rewriter.catalogs
    result.seconds = time.monotonic() - start
    log.info("%s", result.summary(repo.name))
    return result


def keep_superseded(base: Manifest, now: int) -> Callable[[History], None]:
    """Tag the revision being replaced as of ``now``: gc keeps it for its readers' window."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def tag(history: History) -> None:
        history.put(Tag(f"{AUTO_PREFIX}{stamp}-replaced-{base.revision}", base.root_catalog,
                        base.revision, now, "replaced by userpub recompress",
                        base.catalog_size))

    return tag


def _canonical(store: ObjectStore, digest: str, suffix: str) -> bool:
    stored = store.path(digest, suffix).read_bytes()
    return is_canonical(stored, decompress(stored))
