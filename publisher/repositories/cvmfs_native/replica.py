"""A stratum-1 pull: copy a repository's new revision from its origin over HTTP, as ``pull`` does.

:meth:`ReplicaPuller.pull` fetches ``.cvmfspublished`` and checks the chain of trust
(:mod:`.replica_trust`), then walks the catalog tree from the root catalog and fetches only what
the replica lacks: catalogs, the file objects and chunks they name, nested catalogs, the
revisions the history tags, the history, certificate and meta-info. Every object is checked
against its name before it is stored (written to ``data/txn``, renamed into place) and is kept
byte for byte as the origin stores it (never recompressed).

A catalog is stored only after everything it references is stored, so a catalog present in the
replica means its whole subtree is: a pull costs in proportion to what changed. The replica never
serves a revision it has not completely: ``.cvmfswhitelist``, ``.cvmfsreflog`` (the origin's, whose
hash the manifest names) and ``.cvmfspublished`` are installed last, each atomically, the
manifest last. A revision older than the replica's is refused.

The caller holds the replica's lock: one pull (or collection) of a replica at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from publisher.repositories.cvmfs_native.fetch import Fetcher, FetchError, NotFoundError
from publisher.repositories.cvmfs_native.layout import (
    MANIFEST,
    REFLOG,
    REPLICA,
    STATUS,
    WHITELIST,
    write_atomic,
    write_status,
)
from publisher.repositories.cvmfs_native.manifest import LetterError, Manifest, split_letter
from publisher.repositories.cvmfs_native.objects import (
    CATALOG,
    CERTIFICATE,
    HISTORY,
    METAINFO,
    ObjectStore,
)
from publisher.repositories.cvmfs_native.replica_objects import (
    nested,
    opened,
    read_local_manifest,
    references,
    tagged_roots,
)
from publisher.repositories.cvmfs_native.replica_state import ReplicaState, Retained
from publisher.repositories.cvmfs_native.replica_trust import (
    Ensemble,
    ReplicaError,
    fetch_ensemble,
    load_master_key,
)
from userpub.errors import ServiceError
from userpub.fsutil import fsync_dir, syncfs

LAST_SNAPSHOT = ".cvmfs_last_snapshot"
GRACE_SECONDS = 3600.0  # a replaced revision's objects stay this long (readers mid-walk)
_ATTEMPTS = 3  # the origin may publish between our manifest and reflog fetches

__all__ = ["GRACE_SECONDS", "Origin", "PullInterruptedError", "PullResult", "ReplicaError",
           "ReplicaPuller", "read_local_manifest"]


class PullInterruptedError(ReplicaError):
    """The pull was asked to stop; nothing was installed."""


class _OriginMovedError(Exception):
    """The origin published another revision while this one was being pulled."""


@dataclass(frozen=True)
class Origin:
    """Where a replica comes from: the stratum-0 URL, the name, the trusted master key."""

    url: str  # http://host:port/cvmfs/<fqrn>
    fqrn: str
    master_key: Path


@dataclass(frozen=True)
class PullResult:
    """What one pull did."""

    repository: str
    revision: int  # served now
    previous: int | None  # served before (None: the replica was empty)
    origin_revision: int
    changed: bool  # a new manifest or whitelist was installed
    objects: int  # objects fetched, catalogs included
    catalogs: int
    bytes: int  # body bytes received, letters included
    seconds: float
    origin_last_gc: str  # the origin's .cvmfs_status.json last_gc ("" if unknown)

    def describe(self) -> str:
        """One log line."""
        was = "empty" if self.previous is None else f"revision {self.previous}"
        what = (f"{was} -> revision {self.revision}" if self.revision != self.previous
                else f"revision {self.revision} (whitelist renewed)")
        return (f"{self.repository}: {what}: {self.objects} objects ({self.catalogs} catalogs), "
                f"{self.bytes} bytes in {self.seconds:.2f} s")


class ReplicaPuller:
    """Pulls one origin into one replica directory (see the module docstring)."""

    def __init__(self, origin: Origin, root: Path, state_path: Path, *, threads: int = 4,
                 timeout: float = 30.0, retries: int = 3, durable: bool = True,
                 require_marker: bool = True, grace: float = GRACE_SECONDS,
                 clock: Callable[[], float] = time.time,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.origin = origin
        self.root = root
        self.state_path = state_path
        self.store = ObjectStore(root)
        self.threads = max(1, threads)
        self.timeout = timeout
        self.retries = retries
        self.durable = durable
        self.require_marker = require_marker
        self.grace = grace
        self.clock = clock
        self.should_stop = should_stop
        self._window = 8 * self.threads
        self._fetcher: Fetcher | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._objects = 0
        self._catalogs = 0

    # -- the pull ---------------------------------------------------------------------------------
    def pull(self) -> PullResult:
        """Bring the replica to the origin's revision; record the outcome in the state file."""
        started = time.monotonic()
        state = ReplicaState.load(self.state_path, self.origin.fqrn)
        state.origin = self.origin.url
        state.last_attempt = self.clock()
        self._objects = self._catalogs = 0
        self._fetcher = Fetcher(self.origin.url, timeout=self.timeout, retries=self.retries)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="replica")
        try:
            result = self._pull(state, started)
        except (ServiceError, OSError, sqlite3.Error) as err:
            text = str(err) if isinstance(err, ServiceError) else _io_error(err)
            state.last_error = text
            _save_quietly(state, self.state_path)
            if isinstance(err, ReplicaError):
                raise
            raise ReplicaError(text) from None
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._fetcher.close()
            self._pool = self._fetcher = None
            self.store.clear_txn()
        state.revision = result.revision
        state.origin_revision = result.origin_revision
        state.last_success = self.clock()
        state.last_error = ""
        if result.changed:
            state.last_change = state.last_success
        state.save(self.state_path)
        return result

    def _pull(self, state: ReplicaState, started: float) -> PullResult:
        assert self._fetcher is not None
        fetcher = self._fetcher
        master = load_master_key(self.origin.master_key)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store.ensure_layout()
        self.store.clear_txn()
        local = read_local_manifest(self.root)
        try:
            marker = fetcher.get(REPLICA, limit=1 << 16)
        except NotFoundError:
            if self.require_marker:
                raise ReplicaError(f"{self.origin.url} is not a stratum 0 for replication "
                                   f"(no {REPLICA})") from None
            marker = None
        for _ in range(_ATTEMPTS):
            now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
            ensemble = fetch_ensemble(fetcher, self.origin.fqrn, master, self.store, now)
            manifest = ensemble.manifest
            self._check_progress(local, manifest)
            last_gc = self._origin_last_gc()
            if local is not None and local[0] == ensemble.raw:
                changed = self._install_whitelist(ensemble.whitelist)
                state.root_catalog = manifest.root_catalog
            else:
                self._pull_revision(ensemble)
                try:
                    reflog = self._fetch_reflog(manifest)
                except _OriginMovedError:
                    continue  # pull the new revision (what it shares with this one is here)
                self._install(ensemble, reflog, state, local)
                changed = True
            if marker is not None and not (self.root / REPLICA).exists():
                write_atomic(self.root / REPLICA, marker, durable=False)  # as replicable
            return PullResult(self.origin.fqrn, manifest.revision,
                              None if local is None else local[1].revision, manifest.revision,
                              changed, self._objects, self._catalogs, fetcher.bytes_fetched,
                              time.monotonic() - started, last_gc)
        raise ReplicaError(f"{self.origin.url} published a new revision during each of "
                           f"{_ATTEMPTS} attempts; trying again later")

    def _check_progress(self, local: tuple[bytes, Manifest] | None, manifest: Manifest) -> None:
        if local is None:
            return
        have = local[1]
        if manifest.revision < have.revision:
            raise ReplicaError(f"{self.origin.url} serves revision {manifest.revision}, older "
                               f"than the replica's {have.revision}: refusing to go back")
        if manifest.revision == have.revision and manifest.root_catalog != have.root_catalog:
            raise ReplicaError(f"{self.origin.url} serves revision {manifest.revision} with "
                               "another root catalog than the replica's: refusing it")

    def _origin_last_gc(self) -> str:
        """The origin's last garbage collection, as its .cvmfs_status.json says (or "")."""
        assert self._fetcher is not None
        try:
            status = json.loads(self._fetcher.get(STATUS, limit=1 << 20))
        except (FetchError, ValueError):
            return ""
        value = status.get("last_gc", "") if isinstance(status, dict) else ""
        return value if isinstance(value, str) else ""

    # -- catalogs and objects -----------------------------------------------------------------------
    def _have(self, digest: str, suffix: str) -> bool:
        return os.path.exists(self.store.path(digest, suffix))

    def _check_stop(self) -> None:
        if self.should_stop():
            raise PullInterruptedError(f"{self.origin.fqrn}: pull interrupted (stopping)")

    def _download(self, digest: str, suffix: str) -> Path:
        """Fetch one object into data/txn (hash-checked); the caller stores it."""
        assert self._fetcher is not None
        tmp = self.store.temp_path("pull")
        try:
            self._fetcher.download(f"data/{digest[:2]}/{digest[2:]}{suffix}", tmp,
                                   sha1_hex=digest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _store(self, tmp: Path, digest: str, suffix: str) -> None:
        """Main thread: rename a fetched object into place (file objects: _fetch_object)."""
        os.rename(tmp, self.store.path(digest, suffix))
        self._objects += 1

    def _fetch_object(self, digest: str, suffix: str) -> None:
        """Worker: fetch and store one object unless it is there."""
        if self._have(digest, suffix):
            return
        tmp = self._download(digest, suffix)
        os.rename(tmp, self.store.path(digest, suffix))

    def _submit(self, digest: str, suffix: str) -> Future[Path]:
        assert self._pool is not None
        return self._pool.submit(self._download, digest, suffix)

    def _pull_revision(self, ensemble: Ensemble) -> None:
        """Everything the manifest reaches, the history's tagged revisions, then H, X, M."""
        manifest = ensemble.manifest
        self._pull_tree(manifest.root_catalog, optional=False)
        if manifest.history and not self._have(manifest.history, HISTORY):
            history = self._download(manifest.history, HISTORY)
            for root in self._tagged_roots(history):
                if not self._have(root, CATALOG):
                    # a tag's root may be gone from a garbage-collectable origin (cvmfs skips it)
                    self._pull_tree(root, optional=manifest.garbage_collectable)
            self._store(history, manifest.history, HISTORY)
        if manifest.metainfo and not self._have(manifest.metainfo, METAINFO):
            self._store(self._download(manifest.metainfo, METAINFO), manifest.metainfo, METAINFO)
        if not self._have(manifest.certificate, CERTIFICATE):
            tmp = self.store.temp_path("cert")
            tmp.write_bytes(ensemble.certificate)
            os.chmod(tmp, 0o644)
            self._store(tmp, manifest.certificate, CERTIFICATE)

    def _pull_tree(self, digest: str, *, optional: bool) -> None:
        """Pull the catalog ``digest`` and everything below it, unless it is there."""
        if self._have(digest, CATALOG):
            return
        try:
            compressed = self._submit(digest, CATALOG).result()
        except NotFoundError:
            if optional:
                return
            raise
        self._complete_catalog(digest, compressed)

    def _complete_catalog(self, digest: str, compressed: Path) -> None:
        """Fetch what the catalog names and its nested catalogs (recursively), then store it."""
        self._check_stop()
        children = self._fetch_references(compressed)
        todo = (c for c in children if not self._have(c, CATALOG))
        pending: deque[tuple[str, Future[Path]]] = deque()
        try:
            while True:
                while len(pending) < self._window and (child := next(todo, None)):
                    pending.append((child, self._submit(child, CATALOG)))
                if not pending:
                    break
                child, future = pending.popleft()
                self._complete_catalog(child, future.result())
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
        self._store(compressed, digest, CATALOG)
        self._catalogs += 1

    def _fetch_references(self, compressed: Path) -> list[str]:
        """Fetch every object the catalog names that the replica lacks; return its children."""
        with opened(compressed, self.store.temp_path("catalog.db"), "catalog") as conn:
            self._fetch_all(references(conn))
            return nested(conn)

    def _fetch_all(self, wanted: Iterator[tuple[str, str]]) -> None:
        """Fetch the missing ones of ``wanted`` with the worker threads, a bounded window."""
        assert self._pool is not None
        inflight: deque[Future[None]] = deque()
        try:
            for count, (digest, suffix) in enumerate(wanted):
                if count % 1024 == 0:
                    self._check_stop()
                if self._have(digest, suffix):
                    continue
                inflight.append(self._pool.submit(self._fetch_object, digest, suffix))
                self._objects += 1
                if len(inflight) >= self._window:
                    inflight.popleft().result()
            while inflight:
                inflight.popleft().result()
        except BaseException:
            for future in inflight:
                future.cancel()
            raise

    def _tagged_roots(self, history: Path) -> list[str]:
        """The root catalogs the (stored, compressed) history database tags."""
        with opened(history, self.store.temp_path("history.db"), "history") as conn:
            return tagged_roots(conn)

    # -- installing -------------------------------------------------------------------------------
    def _fetch_reflog(self, manifest: Manifest) -> Path | None:
        """The origin's reflog in data/txn (its hash is the manifest's Y), None when it has none;
        _OriginMovedError when the origin has published another revision meanwhile."""
        assert self._fetcher is not None
        if not manifest.reflog:
            return None
        tmp = self.store.temp_path("reflog")
        _, digest = self._fetcher.download(REFLOG, tmp, sha1_hex=None)
        if digest == manifest.reflog:
            return tmp
        tmp.unlink()
        try:
            body, _, _ = split_letter(self._fetcher.get(MANIFEST))
            revision = Manifest.parse(body).revision
        except (LetterError, UnicodeDecodeError) as err:
            raise ReplicaError(f"{self._fetcher.url(MANIFEST)}: {err}") from None
        if revision != manifest.revision:
            raise _OriginMovedError
        raise ReplicaError(f"{self._fetcher.url(REFLOG)} does not hash to the manifest's Y "
                           f"({manifest.reflog})")

    def _install_whitelist(self, whitelist: bytes) -> bool:
        path = self.root / WHITELIST
        try:
            if path.read_bytes() == whitelist:
                return False
        except FileNotFoundError:
            pass
        write_atomic(path, whitelist, durable=self.durable)
        return True

    def _install(self, ensemble: Ensemble, reflog: Path | None, state: ReplicaState,
                 local: tuple[bytes, Manifest] | None) -> None:
        """Switch the replica to the new revision: letters last, the manifest very last."""
        now = self.clock()
        if self.durable:
            syncfs(self.root)
        self._install_whitelist(ensemble.whitelist)
        if reflog is not None:
            os.chmod(reflog, 0o644)
            os.replace(reflog, self.root / REFLOG)
        else:
            (self.root / REFLOG).unlink(missing_ok=True)
        if local is not None:
            old = local[1]
            kept = tuple(f"{h}{s}" for h, s in ((old.certificate, CERTIFICATE),
                                                (old.history, HISTORY), (old.metainfo, METAINFO))
                         if h)
            state.retain(Retained(old.revision, old.root_catalog, kept, now + self.grace), now)
            state.save(self.state_path)  # recorded before the switch: never collected early
        state.root_catalog = ensemble.manifest.root_catalog
        write_atomic(self.root / MANIFEST, ensemble.raw, durable=self.durable)
        stamp = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(now))
        write_atomic(self.root / LAST_SNAPSHOT, f"{stamp}\n".encode(), durable=False)
        write_status(self.root, last_snapshot=stamp)
        if self.durable:
            fsync_dir(self.root)


def _io_error(err: BaseException) -> str:
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return f"local database error: {err}"


def _save_quietly(state: ReplicaState, path: Path) -> None:
    with contextlib.suppress(OSError):
        state.save(path)
