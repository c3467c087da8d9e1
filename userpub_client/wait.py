"""``userpub wait``: on a worker node, wait until a CID shows up in one of the repositories.

Every round checks ``<mount root>/<repo>/<prefix>/<cid>`` in every repository (jobsub_lite
PR #393: all locations each retry), so it does not matter which repository the service
chose. Looking at the path makes autofs mount the repository, and CernVM-FS reloads its
catalog after the repository TTL, so a plain ``stat`` is enough.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WaitResult:
    """``path`` where the CID was found (None on timeout), the places looked at, and rounds."""

    path: Path | None
    candidates: tuple[Path, ...]
    rounds: int
    waited: float


def candidates(cid: str, repos: Sequence[str], mount_root: str = "/cvmfs",
               prefix: str = "sw") -> tuple[Path, ...]:
    """Where ``cid`` would appear, one path per repository, in the given order."""
    base = Path(mount_root)
    return tuple(base / repo / prefix / cid if prefix else base / repo / cid for repo in repos)


def present(path: Path) -> bool:
    """True when ``path`` is a directory (errors such as EACCES or EIO count as absent)."""
    try:
        return os.path.isdir(path)
    except OSError:
        return False


def wait_for(cid: str, repos: Sequence[str], *, mount_root: str = "/cvmfs", prefix: str = "sw",
             timeout: float = 1200.0, interval: float = 15.0,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep,
             on_round: Callable[[int, float], None] | None = None) -> WaitResult:
    """Check every candidate each round until one is a directory or ``timeout`` has passed.

    The first round is immediate; a round is always made at the deadline too, so a
    timeout of 0 means "check once". ``on_round(round, elapsed)`` reports progress.
    """
    paths = candidates(cid, repos, mount_root, prefix)
    start = clock()
    rounds = 0
    while True:
        rounds += 1
        for path in paths:
            if present(path):
                return WaitResult(path, paths, rounds, clock() - start)
        elapsed = clock() - start
        if on_round is not None:
            on_round(rounds, elapsed)
        if elapsed >= timeout:
            return WaitResult(None, paths, rounds, elapsed)
        sleep(max(0.0, min(interval, timeout - elapsed)))
