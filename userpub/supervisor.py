"""``userpub run``: start every daemon of this host, restart what dies, stop them gracefully.

Each child's stderr passes through the supervisor line by line. A child that exits with
``fatal:`` lines (a problem of the setup, such as a port in use or a missing repository root:
restarting cannot help) makes the supervisor stop every other daemon and fail with those
lines; any other death is restarted, with backoff. A clean stop ends with a ``stopped`` line.

Production sites may prefer one systemd unit per daemon (see ``docs/operations.md``); this
supervisor serves the quickstart and small sites.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from userpub.config import Config
from userpub.daemon import Waker
from userpub.errors import ServiceError

log = logging.getLogger("userpub.supervisor")

MAX_BACKOFF = 60.0
STABLE_AFTER = 60.0
FATAL = b"fatal: "


class SupervisorError(ServiceError):
    """The daemons cannot run: nothing to run here, or a child failed with ``fatal:`` lines."""


@dataclass(frozen=True)
class ChildSpec:
    """One daemon to keep running."""

    name: str
    argv: tuple[str, ...]
    stop_order: int  # lower stops first (ingest before publishers: stop taking uploads first)


def plan_children(config: Config, python: str) -> list[ChildSpec]:
    """The daemons of this host: ingest (if configured), one publisher per hosted repository,
    the janitor, and the replicator where this host keeps replicas to pull."""
    from publisher.repositories.replicas import replica_targets, snapshot_replicas

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
    if replica_targets(config) or snapshot_replicas(config):
        children.append(ChildSpec("replicator", (*base, "replicator"), 1))
    return children


@dataclass
class _Running:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    relay: threading.Thread | None = None
    fatal: list[str] = field(default_factory=list)  # the fatal lines of the current process


class Supervisor:
    """Keeps a set of child processes alive until asked to stop (or one cannot start)."""

    def __init__(self, children: list[ChildSpec], waker: Waker, stop_timeout: float = 1800.0,
                 output: BinaryIO | None = None) -> None:
        self.children = [_Running(spec) for spec in children]
        self.waker = waker
        self.stop_timeout = stop_timeout
        self.output = output if output is not None else sys.stderr.buffer
        self.output_lock = threading.Lock()
        self.failed: _Running | None = None

    def run(self) -> int:
        """Supervise until stopped, then stop the children in order and return 0; raise
        SupervisorError (after stopping the others) when a child fails with fatal lines."""
        if not self.children:
            raise SupervisorError("nothing to run: this host hosts no repository and no ingest")
        for child in self.children:
            self._start(child)
        while not self.waker.stopped and self.failed is None:
            self.waker.wait(0.5)
            now = time.monotonic()
            for child in self.children:
                self._check(child, now)
                if self.failed is not None:
                    break
        self._stop_all()
        if self.failed is not None:
            name = self.failed.spec.name
            raise SupervisorError(*(f"{name}: {line}" for line in self.failed.fatal))
        log.info("stopped")
        return 0

    def _start(self, child: _Running) -> None:
        child.process = subprocess.Popen(child.spec.argv, start_new_session=True,
                                         stderr=subprocess.PIPE)
        child.started = time.monotonic()
        child.fatal = []
        assert child.process.stderr is not None
        child.relay = threading.Thread(target=self._relay, args=(child.process.stderr,
                                                                 child.fatal),
                                       name=f"relay-{child.spec.name}", daemon=True)
        child.relay.start()
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def _relay(self, stream: IO[bytes], fatal: list[str]) -> None:
        """Copy a child's stderr to ours, line by line; remember its fatal lines."""
        with stream:
            for line in iter(stream.readline, b""):
                if line.startswith(FATAL):
                    fatal.append(line[len(FATAL):].decode(errors="replace").rstrip())
                with self.output_lock, contextlib.suppress(OSError, ValueError):
                    self.output.write(line if line.endswith(b"\n") else line + b"\n")
                    self.output.flush()

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
        if child.relay is not None:
            child.relay.join(5)  # its last lines, the fatal ones among them
        if code == 1 and child.fatal:
            log.error("%s (pid %d) cannot start: %s; stopping every daemon", child.spec.name,
                      proc.pid, "; ".join(child.fatal))
            child.process = None
            self.failed = child
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
                if child.relay is not None:
                    child.relay.join(5)


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
