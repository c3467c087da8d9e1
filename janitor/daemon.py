"""``userpub janitor``: the daemon that follows the rota, and the one-shot ``--now``/``--dry-run``.

The daemon wakes when the next slot begins (at least every ``max_sleep`` seconds), cleans every
repository :func:`janitor.rota.due_repositories` names, one after the other, and records each
success in ``<state>/janitor/<repo>.json`` (see :mod:`janitor.state`). A failed cleanup is
retried after ``retry_seconds``; a stop request ends a cleanup between two CIDs (each CID is
then fully there or fully gone) and records nothing, so the run is caught up at the next start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import TextIO

from janitor.cleanup import (
    CleanupError,
    CleanupResult,
    StaleReplicaError,
    UnreadableError,
    clean,
    format_preview,
    iso_time,
    preview,
)
from janitor.rota import due_repositories, plan, seconds_until_next
from janitor.state import RunRecord, StateStore
from metrics import JanitorMetrics
from spool import Spool
from userpub.checks import directory_problem, port_conflicts
from userpub.config import Config
from userpub.daemon import Waker
from userpub.errors import ServiceError

log = logging.getLogger("userpub.janitor")

__all__ = ["Janitor", "JanitorError", "parse_time", "record_result", "run_dry", "run_now",
           "startup_problems", "state_store"]

CleanFn = Callable[..., CleanupResult]


def state_store(config: Config) -> StateStore:
    """Where the janitor of this host keeps its run records."""
    return StateStore(config.server.state / "janitor")


def record_result(metrics: JanitorMetrics, store: StateStore | None, result: CleanupResult,
                  started: float, finished: float) -> None:
    """Remember a completed cleanup in ``store`` (first), export it as metrics, log it."""
    name = result.repository
    outcome = "success" if result.completed else "interrupted"
    if result.completed:
        if store is not None:
            store.save(RunRecord(name, started, finished, result.cids, result.stamps,
                                 result.bytes_freed))
        metrics.last_success.labels(name).set(finished)
    metrics.runs.labels(name, outcome).inc()
    metrics.removed_cids.labels(name).inc(result.cids)
    metrics.removed_stamps.labels(name).inc(result.stamps)
    metrics.freed_bytes.labels(name).inc(result.bytes_freed)
    metrics.duration.labels(name).set(result.duration)
    log.info("%s: cleanup %s: %d CIDs, %d stamps, %d bytes freed; %d failed entries and %d tmp "
             "leftovers removed; %d CIDs kept (used during the cleanup); %.2f s, publishing "
             "held up %.2f s", name, outcome, result.cids, result.stamps, result.bytes_freed,
             result.failed_entries, result.tmp_entries, result.spared, result.duration,
             result.lock_seconds)


class JanitorError(ServiceError):
    """The janitor cannot run as asked (no repository hosted here, a bad --as-of, ...)."""


def startup_problems(config: Config, *, create: bool) -> list[str]:
    """Why the janitor of this host cannot start (one line each; see :mod:`userpub.checks`):
    no repository hosted here, its state and lock directories, the spool (it cleans
    ``failed/`` and ``tmp/``), ports shared by two daemons. With ``create`` the missing
    directories are made, as the janitor does when it starts."""
    if not config.hosted:
        return [f"this server ({config.server.name}) hosts no repository to clean"]
    problems = [p for p in (directory_problem(state_store(config).directory, "state",
                                              create=create),
                            directory_problem(config.lock_dir, "state", create=create))
                if p is not None]
    problems += Spool(config.server.spool).layout_problems(create=create)
    return problems + port_conflicts(config)


class Janitor:
    """The rota daemon (see :mod:`userpub.daemon`)."""

    name = "janitor"

    def __init__(self, config: Config, metrics: JanitorMetrics, waker: Waker, *,
                 tz: tzinfo | None = None, clock: Callable[[], float] = time.time,
                 clean_fn: CleanFn = clean, retry_seconds: float = 600.0,
                 max_sleep: float = 300.0, startup_grace: float = 300.0,
                 wait_seconds: float = 2.0) -> None:
        self.config = config
        self.metrics = metrics
        self.waker = waker
        self.tz = tz
        self.clock = clock
        self.clean_fn = clean_fn
        self.retry_seconds = retry_seconds
        self.max_sleep = max_sleep
        self.store = state_store(config)
        self.hosted = [r.name for r in config.hosted]
        self.retry_at: dict[str, float] = {}
        # A repository of this host is created by its publisher when that starts, maybe after
        # us: for startup_grace seconds, such a repository being unreadable only postpones
        # the cleanup (by wait_seconds), quietly; afterwards it is a failure like any other.
        self.startup_grace = startup_grace
        self.wait_seconds = wait_seconds
        self.started = time.monotonic()
        self.waited: set[str] = set()

    def initialize(self) -> None:
        """Check the setup (JanitorError: every problem, one line each), load the records
        and log the rota."""
        problems = startup_problems(self.config, create=True)
        if problems:
            raise JanitorError(*problems)
        self.started = time.monotonic()
        records = [r for r in map(self.store.load, self.hosted) if r is not None]
        for record in records:
            self.metrics.last_success.labels(record.repository).set(record.finished)
        last = {r.repository: r.started for r in records}
        for slot in plan(self.clock(), self.config, last, self.tz):
            previous = last.get(slot.repository)
            log.info("%s: cleaned daily at %02d:00 (position %d); last success %s; now %s",
                     slot.repository, slot.start.hour, slot.position,
                     iso_time(previous) if previous is not None else "never", slot.state.value)

    def run_once(self, now: float) -> float:
        """Clean what is due at ``now``; return the seconds until the next slot (capped)."""
        t0 = time.monotonic()
        last = self.store.last_success(self.hosted)
        for name in due_repositories(now, self.config, last, self.tz):
            if self.waker.stopped:
                break
            if self.retry_at.get(name, 0.0) > now:
                continue
            self._clean(name, now + time.monotonic() - t0)
        after = now + time.monotonic() - t0  # cleanups take time: a later slot may have begun
        backing_off = {name for name, t in self.retry_at.items() if t > after}
        last = self.store.last_success(self.hosted)
        wait = seconds_until_next(after, self.config, last, self.tz, ignore=backing_off)
        retries = [self.retry_at[name] - after for name in backing_off]
        return min([wait, self.max_sleep, *retries])

    def shutdown(self) -> None:
        """Nothing to release: locks are held only during a cleanup."""

    def _clean(self, name: str, now: float) -> None:
        """Clean ``name``; ``now`` is the (injected) time it starts, recorded on success."""
        try:
            result = self.clean_fn(self.config, name, clock=self.clock,
                                   should_stop=lambda: self.waker.stopped)
        except StaleReplicaError as err:
            self.retry_at[name] = now + self.retry_seconds
            self.metrics.runs.labels(name, "skipped").inc()
            self.metrics.skipped.labels(name, "stale_replica").inc()
            log.warning("%s: cleanup skipped: %s; trying again in %.0f s", name, err,
                        self.retry_seconds)
            return
        except UnreadableError as err:
            if err.repository in self.hosted and \
                    time.monotonic() - self.started < self.startup_grace:
                if err.repository not in self.waited:
                    self.waited.add(err.repository)
                    log.info("%s: cleanup waits until the publisher of %s has created it "
                             "(%s)", name, err.repository, err)
                self.retry_at[name] = now + self.wait_seconds
                return
            self._failed(name, now, err)
            return
        except Exception as err:
            self._failed(name, now, err)
            return
        self.retry_at.pop(name, None)
        record_result(self.metrics, self.store, result, now, self.clock())

    def _failed(self, name: str, now: float, err: Exception) -> None:
        """Count a failed cleanup, log it, and retry it after ``retry_seconds``."""
        self.retry_at[name] = now + self.retry_seconds
        self.metrics.runs.labels(name, "failed").inc()
        if isinstance(err, CleanupError):
            log.error("%s: cleanup failed: %s; retrying in %.0f s", name, err,
                      self.retry_seconds)
        else:
            log.error("%s: cleanup failed; retrying in %.0f s", name, self.retry_seconds,
                      exc_info=err)


def parse_time(text: str) -> float:
    """An ISO 8601 time (local time when no offset is given) as a Unix time; JanitorError if bad."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise JanitorError(f"--as-of {text!r} is not an ISO 8601 time (e.g. 2026-12-01T03:00)") from None
    return when.timestamp() if when.tzinfo else when.astimezone().timestamp()


def _names(config: Config, repo: str | None, *, hosted_only: bool) -> list[str]:
    if repo is None:
        names = [r.name for r in config.hosted]
        if not names:
            raise JanitorError(f"this server ({config.server.name}) hosts no repository")
        return names
    try:
        cfg = config.repository(repo)
    except KeyError:
        raise JanitorError(f"repository {repo!r} is not configured") from None
    if hosted_only and not cfg.is_hosted_on(config.server.name):
        raise JanitorError(f"repository {repo} is published by {cfg.host}, "
                    f"not by this server ({config.server.name})")
    return [repo]


def run_dry(config: Config, repo: str | None, as_of: float | None, out: TextIO) -> int:
    """Print what a cleanup of ``repo`` (default: every hosted one) would remove."""
    for i, name in enumerate(_names(config, repo, hosted_only=False)):
        try:
            lines = format_preview(preview(config, name, as_of=as_of, include_spool=i == 0))
        except CleanupError as err:
            raise JanitorError(str(err)) from None
        print("\n".join(lines), file=out, flush=True)
    return 0


def run_now(config: Config, repo: str | None, as_of: float | None, metrics: JanitorMetrics,
            waker: Waker, clock: Callable[[], float] = time.time) -> int:
    """Clean ``repo`` (default: every hosted one) now; 1 if a cleanup failed or was stopped.

    A completed cleanup counts as the repository's run of the rota day (unless ``as_of``).
    """
    if as_of is not None and as_of > clock() + 60:
        raise JanitorError("--as-of lies in the future: a real cleanup never judges ahead of time; "
                    "use it with --dry-run")
    store = state_store(config)
    status = 0
    for name in _names(config, repo, hosted_only=True):
        if waker.stopped:
            return 1
        started = clock()
        try:
            result = clean(config, name, as_of=as_of, clock=clock,
                           should_stop=lambda: waker.stopped)
        except CleanupError as err:
            metrics.runs.labels(name, "failed").inc()
            log.error("%s: cleanup failed: %s", name, err)
            status = 1
            continue
        # judged at another time, it is not the day's cleanup: the rota still runs
        record_result(metrics, store if as_of is None else None, result, started, clock())
        status = status if result.completed else 1
    return status
