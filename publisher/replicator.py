"""``userpub replicator``: keep every replica of this host fresh, as a stratum 1's snapshots do.

Every ``[server] replica_interval`` seconds each replica (:func:`replica_targets`) is pulled
from its origin under its lock (:class:`ReplicaPuller`); a pull that changed something is
logged in one line, a failure in one line (repeated only when the reason changes, or every ten
minutes). After a pull the replica is garbage-collected when due (:func:`collect_if_due`:
after the origin's own collection, and daily). A stop request ends a pull between two objects:
nothing half-pulled is ever served.

Replicas of cvmfs-server repositories (stratum 1s of cvmfs_server's own, made by ``userpub
initrepos``) are refreshed the same way with ``cvmfs_server snapshot``, and recorded in the
same record, so freshness reads alike for both backends.

A replica whose origin's master public key is not on this host yet gets it from the peer that
publishes the repository, over the mutual-TLS peer channel (``/pubapi/peer/masterkey``), and
keeps it: later pulls check every whitelist against that pinned key.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence

from filelock import FileLock, Timeout

from metrics import ReplicatorMetrics
from publisher.repositories.cvmfs_native.manifest import LetterError, Manifest, split_letter
from publisher.repositories.cvmfs_native.replica import (
    GRACE_SECONDS,
    PullInterruptedError,
    ReplicaError,
    ReplicaPuller,
)
from publisher.repositories.cvmfs_native.replica_gc import collect_if_due
from publisher.repositories.cvmfs_native.replica_state import ReplicaState
from publisher.repositories.cvmfs_server.setup import snapshot
from publisher.repositories.cvmfs_server.subprocess_log import CommandResult, run_command
from publisher.repositories.replicas import (
    ReplicaTarget,
    replica_lock_path,
    replica_state_path,
    replica_targets,
    snapshot_replicas,
)
from userpub.config import Config, RepositoryConfig
from userpub.daemon import Waker
from userpub.errors import ServiceError
from userpub.fsutil import fsync_file, rename_noreplace, unique_id, write_new_file
from userpub.peers import PeerClient

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
        self.peers = PeerClient.from_config(config, timeout=timeout)
        self.snapshots: list[RepositoryConfig] = []
        self.cvmfs_server = shutil.which("cvmfs_server")

    def initialize(self) -> None:
        """Find the replicas to pull; ReplicatorError when there is none."""
        targets = replica_targets(self.config)
        snapshots = list(snapshot_replicas(self.config))
        if self.only is not None:
            targets = [t for t in targets if t.name == self.only]
            snapshots = [r for r in snapshots if r.name == self.only]
            if not targets and not snapshots:
                raise ReplicatorError(f"{self.only} is not a replica with an origin on this "
                                      f"server ({self.config.server.name})")
        if not targets and not snapshots:
            raise ReplicatorError(f"this server ({self.config.server.name}) keeps no "
                                  "replica with an origin to pull from")
        if snapshots and self.cvmfs_server is None:
            raise ReplicatorError("cvmfs_server not found on PATH: the replicas of "
                                  f"{', '.join(r.name for r in snapshots)} need its snapshot")
        self.targets = targets
        self.snapshots = snapshots
        for repo in snapshots:
            log.info("%s: cvmfs_server replica %s refreshed by snapshot every %.0f s", repo.name,
                     repo.replica, self.interval)
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
        for repo in self.snapshots:
            if self.waker.stopped:
                break
            self.snapshot(repo)
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
            if self._master_key_ready(target):
                self._pull(target)
        finally:
            lock.release()

    def _master_key_ready(self, target: ReplicaTarget) -> bool:
        """True when the origin's master public key is here (fetched from its peer if not)."""
        path = target.origin.master_key
        if path.exists():
            return True
        try:
            peer = self.config.peer(target.repository.host)
        except KeyError:
            peer = None
        pem = (self.peers.master_key(peer, target.name)
               if peer is not None and self.peers is not None else None)
        if pem is None or peer is None:
            self.failed.add(target.name)
            self._error(target.name, f"master public key {path} is missing and the publishing "
                        f"server ({target.repository.host}) did not provide it")
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{unique_id()}")
        write_new_file(partial, pem)
        fsync_file(partial)
        try:
            rename_noreplace(partial, path)  # a key placed meanwhile by the operator wins
        except FileExistsError:
            partial.unlink()
        log.info("%s: master public key pinned from peer %s into %s", target.name, peer.name,
                 path)
        return True

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

    def snapshot(self, repo: RepositoryConfig) -> None:
        """Refresh a cvmfs-server replica with ``cvmfs_server snapshot`` and record it."""
        lock = FileLock(replica_lock_path(self.config, repo.name))
        try:
            lock.acquire(timeout=self.interval / 2)
        except Timeout:
            log.info("%s: another process is refreshing the replica; skipped", repo.name)
            return
        try:
            self._snapshot(repo)
        finally:
            lock.release()

    def _snapshot(self, repo: RepositoryConfig) -> None:
        assert self.cvmfs_server is not None
        program = self.cvmfs_server

        def run(argv: Sequence[str]) -> CommandResult:
            return run_command([program, *argv], timeout=repo.command_timeout, log=log,
                               stderr_level=logging.INFO)

        path = replica_state_path(self.config, repo.name)
        state = ReplicaState.load(path, repo.name)
        state.last_attempt = self.clock()
        result = snapshot(repo, run)
        self.metrics.pull_seconds.labels(repo.name).observe(result.seconds)
        if not result.ok:
            state.last_error = result.describe()
            state.save(path)
            self.metrics.pulls.labels(repo.name, "failed").inc()
            self.failed.add(repo.name)
            self._error(repo.name, f"snapshot failed: {result.describe()}")
            return
        revision = _served_revision(repo)
        changed = revision != state.revision
        state.revision, state.last_success, state.last_error = revision, self.clock(), ""
        if changed:
            state.last_change = state.last_success
        state.save(path)
        self.failed.discard(repo.name)
        if self._errors.pop(repo.name, None) is not None:
            log.info("%s: snapshots succeed again", repo.name)
        self.metrics.pulls.labels(repo.name, "changed" if changed else "unchanged").inc()
        if changed:
            log.info("%s: snapshot brought the replica to revision %d in %.2f s", repo.name,
                     revision, result.seconds)

    def _error(self, key: str, text: str) -> None:
        """Log ``text`` for ``key`` (``<repo>`` or ``<repo>:gc``) unless it was just logged."""
        now = time.monotonic()
        last = self._errors.get(key)
        if last is not None and last[0] == text and now - last[1] < REPEAT_ERROR_SECONDS:
            return
        self._errors[key] = (text, now)
        log.error("%s: %s", key.partition(":")[0], text)


def freshness_records(config: Config) -> dict[str, tuple[int, float]]:
    """``{repository: (revision, last successful pull)}`` of the replicas this host refreshes."""
    records = {}
    names = [t.name for t in replica_targets(config)] + [r.name for r in
                                                          snapshot_replicas(config)]
    for name in names:
        state = ReplicaState.load(replica_state_path(config, name), name)
        if state.last_success > 0:
            records[name] = (state.revision, state.last_success)
    return records


def _served_revision(repo: RepositoryConfig) -> int:
    """The revision in the replica's ``.cvmfspublished`` (0 when it cannot be read)."""
    assert repo.replica is not None
    try:
        body, _, _ = split_letter((repo.replica / ".cvmfspublished").read_bytes())
        return Manifest.parse(body).revision
    except (OSError, LetterError, ValueError):
        return 0
