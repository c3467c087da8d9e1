"""Can this host accept and publish right now? What ``/pubapi/ping`` answers.

Ready means: not shutting down, the spool writable with its reserve free, and at least one
publisher of a repository hosted here alive (it holds its lifetime lock,
``<state>/locks/<repo>.lock``). Otherwise ping gives the original's "not running" answer
(``400 Bad request: Service not running``), so that a load balancer or a DNS health check
takes the host out. The answer is cached for a second: a health check every few
milliseconds costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

from spool import Spool
from userpub.config import Config
from userpub.locks import lock_path

__all__ = ["Readiness", "lock_is_held"]

log = logging.getLogger("userpub.ingest")

CACHE_SECONDS = 1.0


def lock_is_held(path: os.PathLike[str] | str) -> bool:
    """True while another process holds the flock of ``path`` (a missing file: not held).

    Tested with a non-blocking lock taken and released at once: a publisher starting at that
    instant waits for a moment, never fails (it polls for its lock).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class Readiness:
    """Why this host cannot accept and publish now (:meth:`problem`), or None when it can."""

    def __init__(self, config: Config, spool: Spool, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.spool = spool
        self.clock = clock
        self.reserve = config.ingest.spool_reserve_bytes if config.ingest else 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._problem: str | None = None

    def stop(self) -> None:
        """This host is shutting down: not ready from now on."""
        self._stopping.set()

    def problem(self) -> str | None:
        """The reason this host is not ready, or None (cached for a second)."""
        if self._stopping.is_set():
            return "shutting down"
        with self._lock:
            now = self.clock()
            if now - self._checked >= CACHE_SECONDS:
                problem = self._check()
                if problem != self._problem:
                    log.info("readiness: %s", problem or "ready")
                self._problem, self._checked = problem, now
            return self._problem

    def _check(self) -> str | None:
        tmp = self.spool.tmp
        if not os.access(tmp, os.W_OK | os.X_OK):
            return f"the spool {tmp} is not writable"
        with contextlib.suppress(OSError):
            st = os.statvfs(tmp)
            if st.f_bavail * st.f_frsize < self.reserve:
                return f"the spool {tmp} has less than its reserve free"
        hosted = self.config.hosted
        if not hosted:
            return f"this server ({self.config.server.name}) publishes no repository"
        if not any(lock_is_held(lock_path(self.config, repo.name)) for repo in hosted):
            return "no publisher is running"
        return None
