"""The process skeleton shared by every daemon: initialize, run_once(now), shutdown.

Signal handlers only set an event; the loop does the logging and the cleanup. A daemon's
``run_once`` returns how long it wants to sleep at most before its next pass; it is woken
earlier by :meth:`Waker.wake` (watchdog events, new work) or by a stop request.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol


class Waker:
    """A stop flag and a wake-up flag that one wait can watch together."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._woken = False
        self._stopped = False

    def wake(self) -> None:
        """Ask the loop for another pass as soon as possible."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask the loop to finish its current pass and exit."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopped

    def wait(self, timeout: float) -> None:
        """Sleep until woken, stopped, or ``timeout`` seconds passed; clears the wake flag."""
        with self._cond:
            if not self._woken and not self._stopped:
                self._cond.wait(max(0.0, timeout))
            self._woken = False


class Daemon(Protocol):
    """What :func:`run_daemon` drives."""

    name: str

    def initialize(self) -> None:
        """Acquire resources and recover from a previous crash; raise a ServiceError if impossible."""

    def run_once(self, now: float) -> float:
        """Do one pass of work; return the longest sleep wanted before the next pass."""

    def shutdown(self) -> None:
        """Release everything; called once, also after errors."""


def install_signal_handlers(waker: Waker) -> None:
    """SIGTERM and SIGINT stop the loop gracefully (the current pass finishes)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        waker.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_daemon(
    daemon: Daemon,
    waker: Waker,
    *,
    once: bool = False,
    clock: Callable[[], float] = time.time,
    error_backoff: float = 5.0,
) -> None:
    """Run ``daemon`` until ``waker`` is stopped (or for one pass with ``once``).

    An exception in a pass is logged and the loop goes on after ``error_backoff`` seconds;
    with ``once`` it propagates. ``shutdown()`` always runs.
    """
    log = logging.getLogger(f"userpub.{daemon.name}")
    daemon.initialize()
    try:
        while True:
            try:
                sleep = daemon.run_once(clock())
            except Exception:
                if once:
                    raise
                log.exception("pass failed; retrying in %.0f s", error_backoff)
                sleep = error_backoff
            if once or waker.stopped:
                break
            waker.wait(sleep)
            if waker.stopped:
                break
    finally:
        daemon.shutdown()
