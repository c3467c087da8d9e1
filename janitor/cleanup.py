"""One cleanup of one repository: judge, re-check, remove in one transaction, collect garbage.

A CID expires when the newest of its publish time and all its stamps, across **all** configured
repositories (:meth:`publisher.repositories.catalog.Catalog.last_access`), is older than ``max_days`` before
``as_of``. A stamp whose CID is in no repository any more goes too.

Locking and safety (:func:`clean`):

1. The janitor takes the repository's *transaction* lock (the one every publish of that
   repository takes; never the publisher's lifetime lock) and holds it from before the scan
   until the transaction is committed: that repository's publishing waits, the others go on.
2. Under the lock it records ``scan_started`` and scans. The repository's own publisher is
   excluded, so nothing of this repository changes until the lock is released.
3. Other repositories' publishers keep running and may stamp (or publish) a CID of this
   repository at any moment. So each candidate is judged again with fresh ``stat`` calls right
   before its removal, and it goes only if its last access is still older than both the cutoff
   and ``scan_started``, and no request for it waits in the spool (``incoming/`` or
   ``active/<repo>/``: a publisher that found the CID present stamps it only after its own
   transaction, which may be waiting for this very lock). So a CID published, stamped or asked
   for after the scan began is never removed, even when ``as_of`` lies in the future. (The
   window left is the microseconds between that re-check and the rename; closing it needs the
   publisher to re-check presence after stamping.)
4. All removals happen in one transaction; the local backend removes a CID by one rename into
   its trash, so a crash (even ``kill -9``) leaves each CID fully there or fully gone, and the
   next cleanup (``recover()`` under the same lock, then ``gc()``) disposes of the leftovers.
5. Garbage collection. ``cvmfs_server gc`` and the native writer's gc need the repository to
   themselves, so for those backends ``gc()`` runs under the lock. The local backend's ``gc()``
   only deletes its trash, which its publisher also does without the lock (``idle()``), and
   deleting a day's worth of trees can take minutes on this disk: the janitor releases the lock
   first, so publishing resumes at once. Publishes that overlap the deletion are slowed (ext4
   without a journal makes the allocator skip inodes freed in the last 60 s, or 360 s while
   their inode-table blocks are dirty), never stopped; one ``syncfs`` after the deletion
   shortens that window.
6. A backend that applies removals only at commit could still see a CID used after its
   re-check; just before the commit every removal still pending is judged once more, and any
   late use aborts the whole transaction (the next run starts over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from filelock import FileLock, Timeout

from janitor.spoolclean import (
    PendingRequests,
    SpoolItem,
    expired_failed,
    remove_failed,
    stale_tmp,
)
from publisher.repositories import (
    Repository,
    RepositoryReader,
    open_reader,
    open_repository,
)
from publisher.repositories.catalog import Catalog
from spool import Spool
from userpub.config import Config
from userpub.locks import transaction_lock_path
from userpub.peers import PeerClient

log = logging.getLogger("userpub.janitor")

__all__ = ["CleanupError", "CleanupResult", "Expired", "Judgement", "Preview", "clean",
           "format_preview", "iso_time", "judge", "preview"]

DAY = 86400.0
HOUR = 3600.0
# File times come from the kernel's coarse clock, a tick behind time.time(): anything stamped
# less than this before the scan began counts as stamped after it.
TIME_SLACK = 1.0


class CleanupError(Exception):
    """A cleanup cannot run safely (a repository is not hosted here, or unreadable)."""


class UnreadableError(CleanupError):
    """A repository cannot be read (not mounted, never published into): ``repository``."""

    def __init__(self, repository: str, reason: str) -> None:
        super().__init__(f"repository {repository} is unreadable: {reason}; refusing to "
                         "judge ages without it")
        self.repository = repository


@dataclass(frozen=True)
class Expired:
    """A CID judged expired, with its newest access across all repositories."""

    cid: str
    last_access: float


@dataclass(frozen=True)
class Judgement:
    """What a scan of one repository found."""

    repository: str
    as_of: float
    cutoff: float  # CIDs last used before this expire...
    not_after: float  # ...and nothing used at or after this (the scan's start) ever does
    scanned: int
    expired: tuple[Expired, ...]
    orphan_stamps: tuple[str, ...]  # stamps here whose CID is (or will be) in no repository

    def is_expired(self, last_access: float | None) -> bool:
        """True when a CID last used at ``last_access`` may go."""
        return last_access is not None and last_access < min(self.cutoff,
                                                              self.not_after - TIME_SLACK)


@dataclass(frozen=True)
class CleanupResult:
    """What one cleanup did (``completed`` is False when a stop request cut it short)."""

    repository: str
    started: float
    duration: float
    cids: int = 0
    stamps: int = 0
    bytes_freed: int = 0
    spared: int = 0  # expired at the scan, used again before their removal
    failed_entries: int = 0
    tmp_entries: int = 0
    completed: bool = True
    lock_seconds: float = 0.0  # how long this repository's publishing was held up


@dataclass(frozen=True)
class Preview:
    """What a cleanup would remove (a dry run)."""

    judgement: Judgement
    sizes: dict[str, int] = field(default_factory=dict)
    failed: tuple[SpoolItem, ...] = ()
    tmp: tuple[SpoolItem, ...] = ()


def _never() -> bool:
    return False


def _nothing(cid: str) -> bool:
    return False


def judge(reader: RepositoryReader, catalog: Catalog, *, as_of: float, max_days: float,
          not_after: float, pending: Callable[[str], bool] = _nothing) -> Judgement:
    """Scan ``reader``'s CIDs and stamps; nothing last used at or after ``not_after`` expires,
    nor anything ``pending`` (a request waiting in the spool) says is being used."""
    cutoff = as_of - max_days * DAY
    limit = min(cutoff, not_after - TIME_SLACK)
    expired: list[Expired] = []
    scanned = 0
    for cid in reader.cids():
        scanned += 1
        last = catalog.last_access(cid)
        if last is not None and last < limit and not pending(cid):
            expired.append(Expired(cid, last))
    going = {e.cid for e in expired}
    orphans: list[str] = []
    for cid in reader.stamps():
        holders = {r.name for r in catalog.readers if r.contains(cid)}
        if holders - {reader.name} or (holders and cid not in going):
            continue
        stamped = reader.stamped_at(cid)
        if stamped is not None and stamped < not_after - TIME_SLACK:
            orphans.append(cid)
    return Judgement(reader.name, as_of, cutoff, not_after, scanned, tuple(expired),
                     tuple(orphans))


def check_readable(catalog: Catalog) -> None:
    """CleanupError unless every repository can be read (its stamps keep CIDs alive)."""
    for reader in catalog.readers:
        reason = reader.unreadable()
        if reason is not None:
            raise UnreadableError(reader.name, reason)


class StaleReplicaError(CleanupError):
    """A copy the judgement needs is too old: this cleanup waits for it (nothing removed)."""


def check_fresh(catalog: Catalog, max_age: float) -> None:
    """StaleReplicaError when a replica has not been refreshed within ``max_age`` seconds: its stamps
    may miss the newest uses, so no age is judged on it."""
    for reader in catalog.readers:
        age = reader.staleness()
        if age is not None and age > max_age:
            when = "never pulled" if age == float("inf") else f"last refreshed {age:.0f} s ago"
            raise StaleReplicaError(f"replica {reader.name} is {when} (more than "
                            f"replica_max_age_seconds = {max_age:.0f}): removing nothing until "
                            "it is fresh")


def peers_last_use(config: Config) -> Callable[[list[str]], dict[str, float]]:
    """The newest use the peers know of each CID (nothing without peers or an [ingest]
    section, whose host certificate the peer calls need)."""
    client = PeerClient.from_config(config, timeout=max(config.pair.timeout, 30.0),
                                    cache_seconds=0.0)
    return client.last_use if client is not None else lambda cids: {}


def clean(config: Config, repo_name: str, *, as_of: float | None = None,
          clock: Callable[[], float] = time.time, should_stop: Callable[[], bool] = _never,
          progress: Callable[[int, int], None] | None = None,
          repository: Repository | None = None, catalog: Catalog | None = None
          ) -> CleanupResult:
    """Clean the hosted repository ``repo_name`` now (see the module docstring).

    ``as_of`` (default: the scan's start) is the time ages are judged at. ``should_stop`` is
    polled while waiting for the lock and between removals; ``progress(done, total)`` is called
    after each CID is handled. Spool housekeeping follows, outside the lock. ``repository``
    and ``catalog`` default to the configured ones.
    """
    repo_cfg = config.repository(repo_name)
    if not repo_cfg.is_hosted_on(config.server.name):
        raise CleanupError(f"repository {repo_name} is published by {repo_cfg.host}, "
                           f"not by this server ({config.server.name})")
    if repository is None:
        repository = open_repository(config, repo_cfg)
    if catalog is None:
        catalog = Catalog.from_config(config)
    started, t0 = clock(), time.monotonic()
    config.lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(transaction_lock_path(config, repo_name), poll_interval=0.01)
    if not _acquire(lock, repo_name, should_stop):
        return CleanupResult(repo_name, started, time.monotonic() - t0, completed=False)
    locked_at = time.monotonic()
    try:
        log.info("%s: cleanup started (holding %s)", repo_name, lock.lock_file)
        check_fresh(catalog, config.pair.replica_max_age_seconds)
        result = _clean_locked(repository, catalog, config.janitor.max_days, as_of, clock,
                               should_stop, progress, PendingRequests(Spool(config.server.spool)),
                               peers_last_use(config))
        if result.completed and repository.gc_needs_lock:
            _collect_garbage(repository)
    finally:
        lock.release()
    lock_seconds = time.monotonic() - locked_at
    log.info("%s: released the lock after %.2f s", repo_name, lock_seconds)
    if result.completed and not repository.gc_needs_lock:
        _collect_garbage(repository)
    now = clock()
    spool = Spool(config.server.spool)
    failed_age = config.janitor.failed_days * DAY
    judged_at = min(now, as_of) if as_of is not None else now
    failed = remove_failed(spool, expired_failed(spool, judged_at, failed_age), judged_at,
                           failed_age)
    tmp = spool.clean_tmp(config.janitor.tmp_grace_hours * HOUR, now) if spool.tmp.is_dir() else 0
    return replace(result, started=started, duration=time.monotonic() - t0,
                   lock_seconds=lock_seconds, failed_entries=failed, tmp_entries=tmp)


def _acquire(lock: FileLock, name: str, should_stop: Callable[[], bool]) -> bool:
    try:
        lock.acquire(blocking=False)
        return True
    except Timeout:
        log.info("%s: waiting for %s (a publish is in progress)", name, lock.lock_file)
    try:
        lock.acquire(cancel_check=should_stop)
    except Timeout:
        log.info("%s: stop requested while waiting for the lock", name)
        return False
    return True


def _clean_locked(repository: Repository, catalog: Catalog, max_days: float,
                  as_of: float | None, clock: Callable[[], float],
                  should_stop: Callable[[], bool],
                  progress: Callable[[int, int], None] | None,
                  pending: Callable[[str], bool],
                  elsewhere: Callable[[list[str]], dict[str, float]] = lambda cids: {}
                  ) -> CleanupResult:
    name = repository.name
    check_readable(catalog)  # before recover(), which writes: never into what is not mounted
    repository.recover()
    scan_started = clock()
    j = judge(repository, catalog, as_of=scan_started if as_of is None else as_of,
              max_days=max_days, not_after=scan_started, pending=pending)
    log.info("%s: %d of %d CIDs unused since %s; %d orphan stamps", name, len(j.expired),
             j.scanned, iso_time(j.cutoff), len(j.orphan_stamps))
    used_elsewhere = elsewhere([item.cid for item in j.expired]) if j.expired else {}
    cids = stamps = freed = spared = 0
    completed = True
    removed: list[str] = []
    with repository.transaction() as txn:
        for done, item in enumerate(j.expired, start=1):
            if should_stop():
                completed = False
                break
            last = catalog.last_access(item.cid)
            peer_use = used_elsewhere.get(item.cid)
            if peer_use is not None and not j.is_expired(peer_use):
                spared += 1
                log.info("%s: kept %s: a peer saw it used at %s", name, item.cid,
                         iso_time(peer_use))
            elif last is not None and not j.is_expired(last):
                spared += 1
                log.info("%s: kept %s: used at %s, after the scan began", name, item.cid,
                         iso_time(last))
            elif pending(item.cid):
                spared += 1
                log.info("%s: kept %s: a request for it waits in the spool", name, item.cid)
            elif last is not None:
                result = txn.remove([item.cid])
                cids += result.cids
                freed += result.bytes_freed
                if result.cids:
                    removed.append(item.cid)
                    log.info("%s: removed %s (last used %s, %.1f days before %s)", name,
                             item.cid, iso_time(last), (j.as_of - last) / DAY, iso_time(j.as_of))
            if progress is not None:
                progress(done, len(j.expired))
        for cid in j.orphan_stamps if completed else ():
            stamped = repository.stamped_at(cid)
            if catalog.locate(cid) is None and stamped is not None and \
                    stamped < scan_started - TIME_SLACK:
                stamps += txn.remove((), [cid]).stamps
        _check_deferred(repository, catalog, j, removed, pending)
    return CleanupResult(name, scan_started, 0.0, cids, stamps, freed, spared,
                         completed=completed)


def _check_deferred(repository: Repository, catalog: Catalog, j: Judgement,
                    removed: list[str], pending: Callable[[str], bool]) -> None:
    """Abort (raise) if a removal not yet visible concerns a CID used since the re-check.

    The local backend's removals take effect at once, so this finds nothing there; backends
    that apply removals at commit (``cvmfs_server publish``) can still change their mind.
    """
    late = [cid for cid in removed if repository.contains(cid)
            and (not j.is_expired(catalog.last_access(cid)) or pending(cid))]
    if late:
        raise CleanupError(f"{len(late)} CIDs (e.g. {late[0]}) were used while their removal "
                           "was pending; transaction aborted, the next run starts over")


def _collect_garbage(repository: Repository) -> None:
    gc = repository.gc()
    log.info("%s: garbage collection freed %d bytes in %.1f s", repository.name,
             gc.bytes_freed, gc.seconds)


def preview(config: Config, repo_name: str, *, as_of: float | None = None,
            clock: Callable[[], float] = time.time, include_spool: bool = True) -> Preview:
    """What a cleanup of ``repo_name`` (any configured repository) would remove; no changes."""
    reader = open_reader(config, config.repository(repo_name))
    catalog = Catalog.from_config(config)
    check_readable(catalog)
    check_fresh(catalog, config.pair.replica_max_age_seconds)
    now = clock()
    spool = Spool(config.server.spool)
    j = judge(reader, catalog, as_of=now if as_of is None else as_of,
              max_days=config.janitor.max_days, not_after=now, pending=PendingRequests(spool))
    if j.expired:  # as a cleanup would: a peer may know of a newer use
        used = peers_last_use(config)([e.cid for e in j.expired])
        j = replace(j, expired=tuple(e for e in j.expired
                                     if used.get(e.cid) is None or j.is_expired(used[e.cid])))
    sizes = {e.cid: reader.size_of(e.cid) for e in j.expired}
    if not include_spool:
        return Preview(j, sizes)
    failed = expired_failed(spool, j.as_of, config.janitor.failed_days * DAY)
    tmp = stale_tmp(spool, now, config.janitor.tmp_grace_hours * HOUR)
    return Preview(j, sizes, tuple(failed), tuple(tmp))


def format_preview(p: Preview) -> list[str]:
    """The lines a dry run prints: one per CID (cid, last access, age), then the rest."""
    j = p.judgement
    going = {e.cid for e in j.expired}
    lines = [f"# {j.repository}: as of {iso_time(j.as_of)}, CIDs last used before "
             f"{iso_time(j.cutoff)} expire"]
    lines += [f"cid {e.cid} last-access {iso_time(e.last_access)} "
              f"age {(j.as_of - e.last_access) / DAY:.1f}d bytes {p.sizes.get(e.cid, 0)}"
              for e in j.expired]
    lines += [f"stamp {cid} orphan: "
              + ("its CID expires here" if cid in going else "its CID is in no repository")
              for cid in j.orphan_stamps]
    lines += [f"failed {i.path.name} failed-at {iso_time(i.since)} "
              f"age {(j.as_of - i.since) / DAY:.1f}d" for i in p.failed]
    lines += [f"tmp {i.path.name} modified {iso_time(i.since)} "
              f"age {(j.not_after - i.since) / HOUR:.1f}h" for i in p.tmp]
    lines.append(f"# would remove {len(j.expired)} CIDs ({sum(p.sizes.values())} bytes), "
                 f"{len(j.orphan_stamps)} stamps, {len(p.failed)} failed entries, "
                 f"{len(p.tmp)} tmp leftovers; {j.scanned - len(j.expired)} CIDs stay")
    return lines


def iso_time(ts: float) -> str:
    """``ts`` as local ISO 8601 time with its UTC offset, to the second."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
