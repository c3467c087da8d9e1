"""The publisher: one process per repository, woken by watchdog, publishing spool entries.

It holds ``state/locks/<repo>.lock`` for its whole life (a second publisher of the same
repository waits, and takes over when the first dies). Each transaction also takes
``<repo>.txn.lock``, which the janitor takes for a cleanup: publishing into that repository
pauses meanwhile, the others go on.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from metrics import PublisherMetrics
from publisher.repositories import Repository, RepositoryError, backend_problems
from publisher.repositories.catalog import Catalog
from publisher.tarball import UnpackError, UnpackLimits, UnpackStats
from spool import BadEntry, CidMismatch, Entry, Kind, Spool, check_payload_digest
from spool.names import is_ignored_name
from userpub.checks import directory_problem, port_conflicts, repository_root_problem
from userpub.config import Config, RepositoryConfig
from userpub.daemon import Waker
from userpub.errors import ServiceError
from userpub.locks import lock_path, transaction_lock_path

log = logging.getLogger("userpub.publisher")

# Why entries fail (the ``reason`` label): a bad or hostile tarball, an unreadable spool
# entry, or a backend that kept failing until max_attempts.
FAILURE_REASONS = ("invalid_tarball", "bad_entry", "backend")


class PublisherError(ServiceError):
    """The publisher cannot start: its repository cannot be opened or recovered."""


# watchdog's inotify emitter logs this ERROR when an event arrives while the observer stops
# (its thread sees its watch already closed): harmless, the event is only a hint and the next
# start lists incoming/ anyway. Dropped while we stop, so that a healthy stop logs no ERROR.
_STOP_RACE = "called when the thread is inactive"


class _StopRaceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _STOP_RACE not in str(record.msg)


def startup_problems(config: Config, repo: RepositoryConfig, *, create: bool) -> list[str]:
    """Why the publisher of ``repo`` cannot start (one line each; see :mod:`userpub.checks`):
    the spool and its ``active/<repo>/``, the lock directory, the repository's root (made
    only with ``create = true``), what the backend needs, ports shared by two daemons. With
    ``create`` the missing directories are made, as the publisher does when it starts."""
    problems = Spool(config.server.spool).layout_problems((repo.name,), create=create)
    for problem in (directory_problem(config.lock_dir, "state", create=create),
                    repository_root_problem(repo, create=create)):
        if problem is not None:
            problems.append(problem)
    return problems + backend_problems(config, repo) + port_conflicts(config)


class _Wakeup(FileSystemEventHandler):
    """Any event in incoming/ is only a hint: wake the loop, which re-lists the directory."""

    def __init__(self, waker: Waker) -> None:
        self.waker = waker

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = event.dest_path or event.src_path
        name = Path(str(path)).name
        if event.event_type in ("created", "moved", "closed") and not is_ignored_name(name):
            self.waker.wake()


@dataclass
class _Batch:
    publish: list[Entry] = field(default_factory=list)
    stamp: list[Entry] = field(default_factory=list)
    present: list[Entry] = field(default_factory=list)


class Publisher:
    """The publisher daemon of one repository (see :mod:`userpub.daemon`)."""

    name = "publisher"

    def __init__(self, config: Config, repo: RepositoryConfig, repository: Repository,
                 spool: Spool, catalog: Catalog, metrics: PublisherMetrics,
                 waker: Waker) -> None:
        self.config = config
        self.repo = repo
        self.repository = repository
        self.spool = spool
        self.catalog = catalog
        self.metrics = metrics
        self.waker = waker
        self.limits = UnpackLimits(config.publisher.max_members,
                                   config.publisher.max_unpacked_bytes)
        self.life_lock = FileLock(lock_path(config, repo.name))
        self.txn_lock = FileLock(transaction_lock_path(config, repo.name))
        self.observer: BaseObserver | None = None
        self.attempts: dict[str, int] = defaultdict(int)
        self.consecutive_errors = 0
        self.retry_at = 0.0  # monotonic time before which a failed batch is not retried
        # Entries of a failed multi-entry transaction are retried one per transaction: a single
        # bad tarball (say, a file over the backend's size limit) must not take every entry of
        # its batch down with it. Names leave the set when their entry is done or failed.
        self.suspects: set[str] = set()
        self.idle_since = time.monotonic()
        self._declare_series()

    def _declare_series(self) -> None:
        """Create every labelled series at zero, so rates work from the first scrape."""
        m, name = self.metrics, self.repo.name
        for metric in (m.latency, m.files, m.bytes, m.batch_size, m.transaction_seconds,
                       m.stamps, m.lock_held):
            metric.labels(name)
        for result in ("published", "present", "stamped", "failed", "retried"):
            m.publishes.labels(name, result)
        for reason in FAILURE_REASONS:
            m.failures.labels(name, reason)

    # -- lifecycle -------------------------------------------------------------------------

    def initialize(self) -> None:
        """Check the setup, take the repository, recover what a crash left, and start watching
        incoming/; PublisherError (every problem, one line each) if it cannot."""
        problems = startup_problems(self.config, self.repo, create=True)
        if problems:
            raise PublisherError(*problems)
        waited = False
        while not self.waker.stopped:
            try:
                self.life_lock.acquire(timeout=1.0)
                break
            except Timeout:
                if not waited:
                    log.info("%s: another publisher holds %s; waiting to take over",
                             self.repo.name, self.life_lock.lock_file)
                    waited = True
        if not self.life_lock.is_locked:
            return
        self.metrics.lock_held.labels(self.repo.name).set(1)
        with self.txn_lock:
            try:
                self.repository.recover()
            except (RepositoryError, OSError) as err:
                raise PublisherError(f"{self.repo.name}: cannot recover the repository: {err}") from None
            returned = self.spool.recover(self.repo.name)
        if returned:
            log.warning("%s: returned %d claimed entries to incoming/", self.repo.name, returned)
        self.spool.clean_tmp(self.config.janitor.tmp_grace_hours * 3600)
        self.observer = (PollingObserver(timeout=1.0) if self.config.publisher.observer == "polling"
                         else Observer())
        self.observer.schedule(_Wakeup(self.waker), str(self.spool.incoming), recursive=False)
        self.observer.start()
        log.info("%s: publisher ready (pid lock %s)", self.repo.name, self.life_lock.lock_file)

    def shutdown(self) -> None:
        """Stop watching and let the repository go."""
        if self.observer is not None:
            race = _StopRaceFilter()
            inotify_log = logging.getLogger("watchdog.observers.inotify")
            inotify_log.addFilter(race)
            try:
                self.observer.stop()
                self.observer.join(5)
            finally:
                inotify_log.removeFilter(race)
        if self.life_lock.is_locked:
            self.life_lock.release()
        self.metrics.lock_held.labels(self.repo.name).set(0)

    def run_once(self, now: float) -> float:
        """Claim one batch from incoming/ and publish it; return the wanted sleep."""
        if not self.life_lock.is_locked:
            return 1.0
        # After a failed transaction, wait out the backoff even when woken: the entries put
        # back into incoming/ wake this very loop, which would retry them at once and spend
        # every attempt within seconds (say, before the operator can free the full disk).
        backoff = self.retry_at - time.monotonic()
        if backoff > 0:
            return backoff
        paths = self._claim_batch()
        if not paths:
            self.repository.idle(time.monotonic() - self.idle_since)
            return self.config.publisher.rescan_seconds
        batch = self._sort(paths)
        if batch.publish or batch.stamp or batch.present:
            ok = self._publish(batch)
            self.idle_since = time.monotonic()
            if not ok:
                self.consecutive_errors += 1
                delay = min(60.0, 2.0 ** self.consecutive_errors)
                self.retry_at = time.monotonic() + delay
                return delay
            self.consecutive_errors = 0
        return 0.0

    # -- one pass --------------------------------------------------------------------------

    def _claim_batch(self) -> list[Path]:
        cfg = self.config.publisher
        claimed: list[Path] = []
        size = 0
        for path in self.spool.list_incoming():
            if len(claimed) >= cfg.batch_max_entries or size >= cfg.batch_max_bytes:
                break
            suspect = path.name in self.suspects
            if suspect and claimed:
                continue  # a suspect is published on its own
            entry_size = _payload_size(path)
            if entry_size is None:
                continue
            if claimed and size + entry_size > cfg.batch_max_bytes:
                continue
            target = self.spool.claim(path, self.repo.name)
            if target is not None:
                claimed.append(target)
                size += entry_size
                if suspect:
                    break
        return claimed

    def _sort(self, paths: list[Path]) -> _Batch:
        batch = _Batch()
        for path in paths:
            try:
                entry = self.spool.read_entry(path)
            except (BadEntry, OSError) as err:
                log.warning("%s: bad spool entry %s: %s", self.repo.name, path.name, err)
                self.spool.fail(path, str(err))
                self.metrics.publishes.labels(self.repo.name, "failed").inc()
                self.metrics.failures.labels(self.repo.name, "bad_entry").inc()
                continue
            try:
                check_payload_digest(entry)  # an operator's drop: the ingest checked uploads
            except (CidMismatch, OSError) as err:
                self._fail(entry, str(err), "bad_entry")
                continue
            if entry.kind is Kind.STAMP:
                batch.stamp.append(entry)
            elif self.catalog.locate(entry.cid) is not None:
                batch.present.append(entry)
            else:
                batch.publish.append(entry)
        return batch

    def _publish(self, batch: _Batch) -> bool:
        name = self.repo.name
        published: list[tuple[Entry, UnpackStats]] = []
        rejected: list[tuple[Entry, str]] = []
        started = time.monotonic()
        try:
            with self.txn_lock, self.repository.transaction() as txn:
                for entry in batch.publish:
                    try:
                        stats = txn.add(entry.cid, entry.payload, entry.submitter, self.limits)
                    except UnpackError as err:
                        rejected.append((entry, str(err)))
                    else:
                        published.append((entry, stats))
                by_who: dict[str, list[str]] = defaultdict(list)
                for entry in batch.stamp + batch.present:
                    by_who[entry.submitter].append(entry.cid)
                for who, cids in by_who.items():
                    txn.stamp(cids, who)
        except Exception as err:
            log.error("%s: transaction of %d entries failed: %s", name,
                      len(batch.publish) + len(batch.stamp) + len(batch.present), err)
            self._retry_or_fail(batch, rejected, str(err))
            return False
        visible = time.time()
        self.metrics.transaction_seconds.labels(name).observe(time.monotonic() - started)
        if published:
            self.metrics.batch_size.labels(name).observe(len(published))
        for entry, stats in published:
            latency = max(0.0, visible - entry.queued_at)
            self.metrics.latency.labels(name).observe(latency)
            self.metrics.publishes.labels(name, "published").inc()
            self.metrics.files.labels(name).inc(stats.files)
            self.metrics.bytes.labels(name).inc(stats.bytes)
            self.attempts.pop(entry.name, None)
            log.info("%s: published %s (%d files, %d bytes, %s) %.2f s after queueing",
                     name, entry.cid, stats.files, stats.bytes, stats.compression, latency)
            self._done(entry)
        for entry, reason in rejected:
            self._fail(entry, reason, "invalid_tarball")
        for entry in batch.present:
            if entry.kind is Kind.PUBLISH and self.catalog.locate(entry.cid) is None:
                # removed by a cleanup between our look and our stamp: publish it after all
                log.info("%s: %s vanished while being stamped; publishing it", name, entry.cid)
                self.spool.release(entry)
                continue
            log.info("%s: %s already published; stamped instead", name, entry.cid)
            self.metrics.publishes.labels(name, "present").inc()
            self._done(entry)
        for entry in batch.stamp:
            self.metrics.stamps.labels(name).inc()
            self.metrics.publishes.labels(name, "stamped").inc()
            self._done(entry)
        if batch.present:
            self.metrics.stamps.labels(name).inc(len(batch.present))
        return True

    def _retry_or_fail(self, batch: _Batch, rejected: list[tuple[Entry, str]], error: str) -> None:
        for entry, reason in rejected:
            self._fail(entry, reason, "invalid_tarball")
        done = {e.name for e, _ in rejected}
        retried = [e for e in batch.publish + batch.stamp + batch.present if e.name not in done]
        if len(retried) > 1:
            self.suspects.update(e.name for e in retried)
        for entry in retried:
            self.attempts[entry.name] += 1
            if self.attempts[entry.name] >= self.config.publisher.max_attempts:
                self._fail(entry, f"gave up after {self.attempts.pop(entry.name)} attempts: "
                                  f"{error}", "backend")
            else:
                self.metrics.publishes.labels(self.repo.name, "retried").inc()
                self.spool.release(entry)

    def _done(self, entry: Entry) -> None:
        self.suspects.discard(entry.name)
        self.spool.complete(entry)

    def _fail(self, entry: Entry, reason: str, category: str) -> None:
        self.suspects.discard(entry.name)
        log.warning("%s: %s failed: %s", self.repo.name, entry.cid, reason)
        self.metrics.publishes.labels(self.repo.name, "failed").inc()
        self.metrics.failures.labels(self.repo.name, category).inc()
        self.spool.fail(entry, reason)


def _payload_size(path: Path) -> int | None:
    """Size of an incoming entry's tarball (0 for stamps), or None if it vanished."""
    try:
        return path.stat().st_size if path.is_file() else (path / "payload").stat().st_size
    except FileNotFoundError:
        return 0 if path.is_dir() else None
