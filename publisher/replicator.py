"""``userpub replicator``: keep every replica of this host fresh, as a stratum 1's snapshots do.

Every ``[server] replica_interval`` seconds each replica (:func:`replica_targets`) is pulled
from its origin under its lock (:class:`ReplicaPuller`); a pull that changed something is
logged in one line, a failure in one line (repeated only when the reason changes, or every ten
minutes). After a pull the replica is garbage-collected when due (:func:`collect_if_due`:
after the origin's own collection, and daily). A stop request ends a pull between two objects:
nothing half-pulled is ever served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from filelock import FileLock, Timeout

from metrics import ReplicatorMetrics
from publisher.repositories.cvmfs_native.replica import (
    GRACE_SECONDS,
    PullInterruptedError,
    ReplicaError,
    ReplicaPuller,
)
from publisher.repositories.cvmfs_native.replica_gc import collect_if_due
from publisher.repositories.cvmfs_native.replica_state import ReplicaState
from publisher.repositories.replicas import ReplicaTarget, replica_targets
from userpub.config import Config
from userpub.daemon import Waker
from userpub.errors import ServiceError

log = logging.getLogger("userpub.replicator")

REPEAT_ERROR_SECONDS = 600.0


class ReplicatorError(ServiceError):
    """The replicator cannot run as asked (nothing to replicate, unknown repository)."""


class Replicator:
    """The replication daemon (see :mod:`userpub.daemon`)."""

    name = "replicator"

    def __init__(self, config: Config, metrics: ReplicatorMetrics, waker: Waker, *,
                 only: str | None = None, threads: int = 4, timeout: float = 30.0,
                 grace: float = GRACE_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.metrics = metrics
        self.waker = waker
        self.only = only
        self.threads = threads
        self.timeout = timeout
        self.grace = grace
        self.clock = clock
        self.interval = config.server.replica_interval
        self.targets: list[ReplicaTarget] = []
        self.failed: set[str] = set()  # replicas whose last pull failed
        self._errors: dict[str, tuple[str, float]] = {}

    def initialize(self) -> None:
        """Find the replicas to pull; ReplicatorError when there is none."""
        targets = replica_targets(self.config)
        if self.only is not None:
            targets = [t for t in targets if t.name == self.only]
            if not targets:
                raise ReplicatorError(f"{self.only} is not a cvmfs-native replica with an origin "
                                      f"on this server ({self.config.server.name})")
        if not targets:
            raise ReplicatorError(f"this server ({self.config.server.name}) keeps no "
                                  "cvmfs-native replica with an origin to pull from")
        self.targets = targets
        self.config.lock_dir.mkdir(parents=True, exist_ok=True)
        for target in targets:
            state = ReplicaState.load(target.state, target.name)
            served = f"revision {state.revision}" if state.revision else "nothing yet"
            log.info("%s: replica %s serves %s; pulled from %s every %.0f s", target.name,
                     target.root, served, target.origin.url, self.interval)

    def run_once(self, now: float) -> float:
        """Pull every replica once; return the seconds until the next round."""
        started = time.monotonic()
        for target in self.targets:
            if self.waker.stopped:
                break
            self.pull(target)
        return max(0.0, self.interval - (time.monotonic() - started))

    def shutdown(self) -> None:
        """Nothing to release: locks are held only during a pull."""

    def pull(self, target: ReplicaTarget) -> None:
        """Pull one replica (skipped this round if another process holds its lock)."""
        lock = FileLock(target.lock)
        try:
            lock.acquire(timeout=self.interval / 2)
        except Timeout:
            log.info("%s: another process is pulling or collecting the replica; skipped",
                     target.name)
            return
        try:
            self._pull(target)
        finally:
            lock.release()

    def _pull(self, target: ReplicaTarget) -> None:
        name = target.name
        puller = ReplicaPuller(target.origin, target.root, target.state, threads=self.threads,
                               timeout=self.timeout, durable=self.config.publisher.durable,
                               grace=self.grace, clock=self.clock,
                               should_stop=lambda: self.waker.stopped)
        started = time.monotonic()
        try:
            result = puller.pull()
        except PullInterruptedError:
            log.info("%s: pull interrupted by the stop request; nothing installed", name)
            return
        except ReplicaError as err:
            self.metrics.pulls.labels(name, "failed").inc()
            self.metrics.pull_seconds.labels(name).observe(time.monotonic() - started)
            self.failed.add(name)
            self._error(name, f"pull failed: {err}")
            return
        self.failed.discard(name)
        if self._errors.pop(name, None) is not None:
            log.info("%s: pulls from %s succeed again", name, target.origin.url)
        self.metrics.pulls.labels(name, "changed" if result.changed else "unchanged").inc()
        self.metrics.pull_seconds.labels(name).observe(result.seconds)
        self.metrics.fetched_bytes.labels(name).inc(result.bytes)
        self.metrics.fetched_objects.labels(name).inc(result.objects)
        if result.changed:
            log.info("%s", result.describe())
        self._collect(target, result.origin_last_gc)

    def _collect(self, target: ReplicaTarget, origin_last_gc: str) -> None:
        try:
            gc = collect_if_due(target.root, target.state, target.name, origin_last_gc,
                                grace=self.grace, clock=self.clock)
        except (ReplicaError, OSError) as err:
            self._error(f"{target.name}:gc", f"garbage collection failed: {err}")
            return
        if gc is None:
            return
        self.metrics.gc_removed.labels(target.name).inc(gc.removed)
        self.metrics.gc_freed.labels(target.name).inc(gc.freed_bytes)
        log.info("%s: garbage collection of the replica removed %d objects (%d bytes), kept %d "
                 "objects of %d revisions, in %.2f s", target.name, gc.removed, gc.freed_bytes,
                 gc.kept, gc.revisions_kept, gc.seconds)

    def _error(self, key: str, text: str) -> None:
        """Log ``text`` for ``key`` (``<repo>`` or ``<repo>:gc``) unless it was just logged."""
        now = time.monotonic()
        last = self._errors.get(key)
        if last is not None and last[0] == text and now - last[1] < REPEAT_ERROR_SECONDS:
            return
        self._errors[key] = (text, now)
        log.error("%s: %s", key.partition(":")[0], text)


def freshness_records(config: Config) -> dict[str, tuple[int, float]]:
    """``{repository: (revision, last successful pull)}`` of this host's pulled replicas."""
    records = {}
    for target in replica_targets(config):
        state = ReplicaState.load(target.state, target.name)
        if state.last_success > 0:
            records[target.name] = (state.revision, state.last_success)
    return records
