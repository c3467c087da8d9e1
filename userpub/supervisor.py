"""``userpub run``: start every daemon of this host, restart what dies, stop them gracefully.

Production sites may prefer one systemd unit per daemon (see ``docs/operations.md``); this
supervisor serves the quickstart and small sites.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from userpub.config import Config
from userpub.daemon import Waker

log = logging.getLogger("userpub.supervisor")

MAX_BACKOFF = 60.0
STABLE_AFTER = 60.0


@dataclass(frozen=True)
class ChildSpec:
    """One daemon to keep running."""

    name: str
    argv: tuple[str, ...]
    stop_order: int  # lower stops first (ingest before publishers: stop taking uploads first)


def plan_children(config: Config, python: str) -> list[ChildSpec]:
    """The daemons of this host: ingest (if configured), one publisher per hosted repository,
    the janitor, and the replicator where this host keeps replicas to pull."""
    from publisher.repositories.replicas import replica_targets

    # -P: never put the working directory on sys.path (a directory named spool/ or metrics/
    # there would shadow our packages)
    base = (python, "-P", "-m", "userpub", "--config", str(config.path))
    children: list[ChildSpec] = []
    if config.ingest is not None:
        children.append(ChildSpec("ingest", (*base, "ingest"), 0))
    children.extend(
        ChildSpec(f"publisher:{repo.name}", (*base, "publisher", "--repo", repo.name), 1)
        for repo in config.hosted
    )
    if config.hosted:
        children.append(ChildSpec("janitor", (*base, "janitor"), 1))
    if replica_targets(config):
        children.append(ChildSpec("replicator", (*base, "replicator"), 1))
    return children


@dataclass
class _Running:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Keeps a set of child processes alive until asked to stop."""

    def __init__(self, children: list[ChildSpec], waker: Waker,
                 stop_timeout: float = 1800.0) -> None:
        self.children = [_Running(spec) for spec in children]
        self.waker = waker
        self.stop_timeout = stop_timeout

    def run(self) -> int:
        """Supervise until stopped; then stop the children in order and return 0."""
        if not self.children:
            log.error("nothing to run: this host hosts no repository and no ingest")
            return 1
        for child in self.children:
            self._start(child)
        while not self.waker.stopped:
            self.waker.wait(0.5)
            now = time.monotonic()
            for child in self.children:
                self._check(child, now)
        self._stop_all()
        return 0

    def _start(self, child: _Running) -> None:
        child.process = subprocess.Popen(child.spec.argv, start_new_session=True)
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def _check(self, child: _Running, now: float) -> None:
        proc = child.process
        if proc is None:
            if now >= child.restart_at and not self.waker.stopped:
                self._start(child)
            return
        code = proc.poll()
        if code is None:
            if now - child.started > STABLE_AFTER:
                child.failures = 0
            return
        child.failures += 1
        delay = min(MAX_BACKOFF, 2.0 ** (child.failures - 1))
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        log.error("%s (pid %d) %s; restarting in %.0f s", child.spec.name, proc.pid, how, delay)
        child.process = None
        child.restart_at = now + delay

    def _stop_all(self) -> None:
        for order in sorted({c.spec.stop_order for c in self.children}):
            group = [c for c in self.children if c.spec.stop_order == order and c.process]
            for child in group:
                assert child.process is not None
                log.info("stopping %s (pid %d)", child.spec.name, child.process.pid)
                _signal(child.process, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for child in group:
                assert child.process is not None
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in time; killing it", child.spec.name)
                    _signal(child.process, signal.SIGKILL)
                    child.process.wait()


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
