"""The ``cvmfs-native`` backend: a genuine CVMFS stratum 0 written without cvmfs_server.

A transaction streams each tarball into objects and a per-CID nested catalog while it is
read (:mod:`.members`, :mod:`.tree`); at commit the namespace catalogs, history and reflog are
written and the signed manifest is switched atomically (:mod:`.publish`, :mod:`.layout`).
Removals and stamps are catalog edits of the same kind; :meth:`NativeRepository.gc` deletes
the objects no kept revision reaches. One writer at a time, under ``.userpub/lock``.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from publisher.repositories.base import GcResult, RemoveResult, RepositoryError
from publisher.repositories.cvmfs_native.chunking import DEFAULT_PARAMS, ChunkParams
from publisher.repositories.cvmfs_native.compression import (
    compressor_problem,
    decompress,
    is_canonical,
)
from publisher.repositories.cvmfs_native.gc import expired, kept_roots, reachable
from publisher.repositories.cvmfs_native.history import History
from publisher.repositories.cvmfs_native.keys import KeyFiles, Keys, KeysError, load_keys
from publisher.repositories.cvmfs_native.layout import write_atomic, write_server_info, write_status
from publisher.repositories.cvmfs_native.manifest import (
    LetterError,
    Manifest,
    Whitelist,
    fingerprint,
    sign_whitelist,
    split_letter,
    whitelist_body,
)
from publisher.repositories.cvmfs_native.members import build_tree
from publisher.repositories.cvmfs_native.objects import (
    CATALOG,
    CERTIFICATE,
    HISTORY,
    METAINFO,
    ObjectPipeline,
)
from publisher.repositories.cvmfs_native.publish import Changes, Identity, RevisionWriter
from publisher.repositories.cvmfs_native.reader import PUBLISHER_RECORD, NativeReader
from publisher.repositories.cvmfs_native.tree import (
    MARKER,
    CatalogContext,
    File,
    FileData,
    iter_files,
    write_catalogs,
)
from publisher.tarball import UnpackLimits, UnpackStats
from publisher.tarball.decompress import UnpackError

log = logging.getLogger("userpub.repository.cvmfs_native")

PARALLEL_FROM = 8 << 20  # tarballs at least this big are stored by worker processes
METAINFO_DEFAULT: dict[str, object] = {
    "administrator": "userpub", "email": "", "organisation": "",
    "description": "user code published by cvmfs-userpub", "recommended-stratum1s": [],
    "custom": {},
}


class NativeRepository(NativeReader):
    """A stratum 0 directory this host writes."""

    gc_needs_lock = True  # gc publishes a revision

    def __init__(self, name: str, root: Path, prefix: str, stamps: str, mount: str, *,
                 keys: KeyFiles, whitelist_days: int = 30, keep_hours: float = 24.0,
                 durable: bool = True, chunk_params: ChunkParams = DEFAULT_PARAMS) -> None:
        super().__init__(name, root, prefix, stamps, mount)
        self.key_files = keys
        self.whitelist_lifetime = datetime.timedelta(days=whitelist_days)
        self.keep_seconds = keep_hours * 3600
        self.durable = durable
        self.chunk_params = chunk_params
        self._keys: Keys | None = None
        self._lock_file: FileLock | None = None
        self._last_idle_check = 0.0
        self._compressor_ok = False

    # -- setup ----------------------------------------------------------------------------------
    def keys(self) -> Keys:
        """The repository's keys (loaded once)."""
        if self._keys is None:
            self._keys = load_keys(self.key_files)
        return self._keys

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the repository's writer lock (one writer at a time)."""
        self.layout.work.mkdir(parents=True, exist_ok=True)
        if self._lock_file is None:
            self._lock_file = FileLock(self.layout.lock)
        with self._lock_file:
            yield

    def writer(self) -> RevisionWriter:
        """A writer of the next revision."""
        who = Identity(self.name, self.prefix, self.stamps_name, os.getuid(), os.getgid(),
                       METAINFO_DEFAULT)
        return RevisionWriter(self.layout, self.store, self.keys(), who, self.store.temp_path,
                              durable=self.durable)

    def check_compressor(self) -> None:
        """RepositoryError unless zlib here makes the bytes genuine CernVM-FS tools expect."""
        if not self._compressor_ok:
            problem = compressor_problem()
            if problem is not None:
                raise RepositoryError(f"{self.name}: {problem}")
            self._compressor_ok = True

    def uses_genuine_compression(self) -> bool:
        """False when the current root catalog is stored in another compression (the old form)."""
        manifest = self.manifest()
        if manifest is None:
            return True
        try:
            stored = self.store.path(manifest.root_catalog, CATALOG).read_bytes()
            return is_canonical(stored, decompress(stored))
        except (OSError, zlib.error) as err:  # not for this check to judge (userpub verify)
            log.error("%s: cannot read the root catalog: %s", self.name, err)
            return True

    def initialize(self) -> None:
        """Create the layout, a first empty revision and a whitelist if there are none."""
        self.check_compressor()
        self.layout.ensure()
        self.store.ensure_layout()
        self.store.index(create=True)
        self.ensure_whitelist()
        if self.manifest() is None:
            manifest = self.writer().write(None, Changes(), int(time.time()))
            log.info("%s: created revision %d", self.name, manifest.revision)
        try:
            write_server_info(self.root, metainfo=METAINFO_DEFAULT)
        except OSError as err:
            log.warning("%s: cannot write info/v1 beside %s: %s", self.name, self.root, err)

    def ensure_whitelist(self, now: datetime.datetime | None = None) -> bool:
        """Re-sign ``.cvmfswhitelist`` when missing, wrong or past half its lifetime."""
        now = now or datetime.datetime.now(datetime.UTC)
        keys = self.keys()
        wanted = fingerprint(keys.certificate_pem)
        try:
            body, _, _ = split_letter(self.layout.whitelist.read_bytes())
            current: Whitelist | None = Whitelist.parse(body)
        except (FileNotFoundError, LetterError):
            current = None
        if (current is not None and current.fqrn == self.name
                and wanted in current.fingerprints
                and current.expires - now > self.whitelist_lifetime / 2):
            return False
        if keys.master_key is None:
            if current is None or current.expires <= now:
                raise RepositoryError(f"{self.name}: the whitelist is missing or expired and the "
                                      "master key is not available to re-sign it")
            log.warning("%s: whitelist expires %s; no master key to re-sign it",
                        self.name, current.expires)
            return False
        body = whitelist_body(self.name, [wanted], now.replace(microsecond=0),
                              self.whitelist_lifetime)
        write_atomic(self.layout.whitelist, sign_whitelist(body, keys.master_key))
        log.info("%s: whitelist signed, valid for %s", self.name, self.whitelist_lifetime)
        return True

    # -- Repository protocol ------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[NativeTransaction]:
        """One revision: published on clean exit, nothing published on an exception."""
        with self.locked():
            try:
                self.initialize()
            except (KeysError, OSError) as err:
                raise RepositoryError(f"{self.name}: {err}") from err
            txn = NativeTransaction(self, self.manifest())
            try:
                yield txn
            except BaseException:
                txn.abort()
                raise
            txn.commit()

    def recover(self) -> None:
        """Drop what an interrupted writer left (temporary files, unswitched generations)."""
        with self.locked():
            leftovers = self.store.clear_txn()
            if leftovers:
                log.warning("%s: removed %d leftovers of an interrupted write", self.name,
                            leftovers)
            self.layout.ensure()
            self.layout.prune_generations(keep=2)
            try:
                self.initialize()
            except KeysError as err:
                raise RepositoryError(str(err)) from None
            if not self.uses_genuine_compression():
                log.warning("%s: the current revision is stored in the old compression (before "
                            "issue 20): stratum 1s and client cache checks reject it; run "
                            "`userpub recompress %s`", self.name, self.name)

    def gc(self) -> GcResult:
        """Delete objects that no kept revision reaches; publishes one revision."""
        start = time.monotonic()
        with self.locked():
            self.initialize()
            base = self.manifest()
            assert base is not None
            now = int(time.time())
            keep_after = int(now - self.keep_seconds) + 1  # tags this old or older go
            history_path = self.store.temp_path("history")
            history_path.write_bytes(self.store.get(base.history, HISTORY))
            history = History(history_path, self.name, create=False)
            tags = history.tags()
            history.conn.close()
            history_path.unlink()
            keep = reachable(self.store, kept_roots(tags, base.root_catalog, keep_after))
            writer = self.writer()
            keep.add(writer.store.put_data(self.keys().certificate_pem, CERTIFICATE).hex
                     + CERTIFICATE)
            doomed = [(name, path) for name, path in self.store.names() if name not in keep]
            drop = [n[:-1] for n, _ in doomed if n[-1:] in (CATALOG, HISTORY, CERTIFICATE,
                                                            METAINFO)]

            def prune(h: History) -> None:
                h.remove([t.name for t in h.tags()
                          if expired(t, keep_after) and t.revision <= base.revision])

            manifest = writer.write(base, Changes(), now, prune=prune, drop_refs=drop)
            fresh = {manifest.root_catalog + CATALOG, manifest.history + HISTORY,
                     manifest.certificate + CERTIFICATE, manifest.metainfo + METAINFO}
            freed = 0
            deleted: list[str] = []
            for name, path in doomed:
                if name in fresh:
                    continue
                try:
                    freed += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                deleted.append(name[:40])
            index = self.store.index()
            if index is not None:
                index.forget(bytes.fromhex(h) for h in deleted if len(h) == 40
                             and all(c in "0123456789abcdef" for c in h))
            write_status(self.root, last_gc=time.strftime("%a %b %d %H:%M:%S UTC %Y",
                                                          time.gmtime(now)))
        log.info("%s: garbage collection freed %d bytes in %d objects", self.name, freed,
                 len(doomed))
        return GcResult(freed, time.monotonic() - start)

    def idle(self, seconds_idle: float) -> None:
        """Hourly: keep the whitelist fresh."""
        now = time.monotonic()
        if now - self._last_idle_check < 3600:
            return
        self._last_idle_check = now
        try:
            with self.locked():
                self.ensure_whitelist()
        except (RepositoryError, KeysError, OSError) as err:
            log.error("%s: whitelist check failed: %s", self.name, err)


class NativeTransaction:
    """Adds, stamps and removals of one revision."""

    def __init__(self, repo: NativeRepository, base: Manifest | None) -> None:
        self.repo = repo
        self.base = base
        self.revision = (base.revision if base else 0) + 1
        self.changes = Changes()
        self._inline = ObjectPipeline(repo.store)
        self._parallel: ObjectPipeline | None = None

    def _objects(self, payload: Path) -> ObjectPipeline:
        """Worker processes for big tarballs; inline storing for small ones (no start-up)."""
        if payload.stat().st_size < PARALLEL_FROM:
            return self._inline
        if self._parallel is None:
            self._parallel = ObjectPipeline(self.repo.store, max(2, os.cpu_count() or 2))
        return self._parallel

    def _close_pipelines(self) -> None:
        self._inline.close()
        if self._parallel is not None:
            self._parallel.close()
            self._parallel = None

    def _check_conflict(self, cid: str) -> None:
        repo, first = self.repo, cid.partition("/")[0]
        pending = set(self.changes.added)
        if "/" in cid:
            if first in pending or (repo.contains(first) and "/" not in first):
                raise UnpackError(f"cid {cid} conflicts with the published cid {first}")
        elif any(c.startswith(cid + "/") for c in pending) or (
                repo.entry(repo.cid_path(cid)) is not None and not repo.contains(cid)):
            raise UnpackError(f"cid {cid} conflicts with the group {cid}/ of other cids")

    def add(self, cid: str, payload: Path, submitter: str, limits: UnpackLimits) -> UnpackStats:
        """Stream ``payload`` into objects and the CID's catalog (visible after commit)."""
        repo = self.repo
        self._check_conflict(cid)
        now_ns = time.time_ns()
        visible = repo.visible_path(cid).encode()
        pipeline = self._objects(payload)
        result = build_tree(payload, visible, limits, pipeline, now_ns, repo.chunk_params)
        pipeline.flush()
        root = result.root
        record = f"{submitter}\n".encode()
        try:
            root.children[MARKER] = File(FileData(0, 0o644, now_ns, repo.store.put_data(b"")))
            root.children[PUBLISHER_RECORD] = File(
                FileData(len(record), 0o644, now_ns, repo.store.put_data(record)))
            for data in iter_files(root):
                data.resolve()
            ctx = CatalogContext(repo.store, self.revision, now_ns // 1_000_000_000,
                                 os.getuid(), os.getgid(), repo.store.temp_path)
            built = write_catalogs(root, repo.cid_path(cid), ctx)
        except OSError as err:
            raise RepositoryError(f"storing {cid} in {repo.name} failed: {err}") from err
        self.changes.added[cid] = built
        return result.stats

    def stamp(self, cids: Iterable[str], who: str) -> None:
        """Set the stamps of these CIDs to now."""
        for cid in cids:
            self.changes.stamped[cid] = who
            self.changes.unstamped.discard(cid)

    def remove(self, cids: Iterable[str], stamps: Iterable[str] = ()) -> RemoveResult:
        """Remove published CIDs and stamps (their objects go at the next gc())."""
        repo = self.repo
        removed = removed_stamps = freed = 0
        for cid in cids:
            if cid in self.changes.removed or not repo.contains(cid):
                continue
            freed += repo.size_of(cid)
            self.changes.removed.add(cid)
            removed += 1
        for cid in stamps:
            if cid in self.changes.unstamped or repo.stamped_at(cid) is None:
                continue
            self.changes.unstamped.add(cid)
            self.changes.stamped.pop(cid, None)
            removed_stamps += 1
        return RemoveResult(removed, removed_stamps, freed)

    def commit(self) -> None:
        """Write and switch to the new revision (nothing if nothing changed)."""
        repo = self.repo
        try:
            self._close_pipelines()
            if not self.changes:
                return
            repo.ensure_whitelist()
            manifest = repo.writer().write(self.base, self.changes, int(time.time()))
        except (OSError, KeysError) as err:
            repo.store.clear_txn()
            raise RepositoryError(f"publish into {repo.name} failed: {err}") from err
        log.info("%s: published revision %d (%d added, %d removed, %d stamped)", repo.name,
                 manifest.revision, len(self.changes.added), len(self.changes.removed),
                 len(self.changes.stamped))

    def abort(self) -> None:
        """Nothing becomes visible; objects already stored are collected later."""
        self._close_pipelines()
        self.repo.store.clear_txn()
