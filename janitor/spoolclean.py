"""What the janitor does with the spool: expired ``failed/`` entries, stale ``tmp/`` leftovers,
and requests still waiting for a CID (a use of that CID not yet visible in any repository).

Neither removal concerns a repository, so neither needs a repository lock. A failed entry is taken out
of sight with one rename into ``tmp/.trash-*`` (which :meth:`spool.Spool.clean_tmp` removes on
sight, should the janitor die before it finishes), then deleted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spool import Kind, Spool, entry_name
from spool.names import TAR_SUFFIXES, is_ignored_name
from spool.queue import REASON
from userpub.fsutil import remove_tree, rename_noreplace, unique_id

log = logging.getLogger("userpub.janitor")

__all__ = ["PendingRequests", "SpoolItem", "expired_failed", "remove_failed", "stale_tmp"]


@dataclass(frozen=True)
class SpoolItem:
    """A spool entry the janitor judged: its path and the time its age counts from."""

    path: Path
    since: float


def failed_time(path: Path) -> float | None:
    """When the entry at ``path`` failed (``reason.json``'s ``time``, else its mtime)."""
    try:
        return float(json.loads((path / REASON).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def expired_failed(spool: Spool, as_of: float, max_age: float) -> list[SpoolItem]:
    """Entries of ``failed/`` that failed more than ``max_age`` seconds before ``as_of``."""
    try:
        names = sorted(os.listdir(spool.failed))
    except FileNotFoundError:
        return []
    items = []
    for name in names:
        if is_ignored_name(name):
            continue
        since = failed_time(spool.failed / name)
        if since is not None and as_of - since > max_age:
            items.append(SpoolItem(spool.failed / name, since))
    return items


def remove_failed(spool: Spool, items: list[SpoolItem], as_of: float, max_age: float) -> int:
    """Remove these failed entries; return how many went.

    Each entry is renamed out of sight first, then judged again: if it was replaced meanwhile
    by a fresh failure of the same CID, it is put back.
    """
    removed = 0
    if items:
        spool.tmp.mkdir(parents=True, exist_ok=True)
    for item in items:
        trash = spool.tmp / f".trash-janitor-{unique_id()}"
        try:
            os.rename(item.path, trash)
        except FileNotFoundError:
            continue
        since = failed_time(trash)
        if since is not None and as_of - since <= max_age:
            try:
                rename_noreplace(trash, item.path)
                continue
            except FileExistsError:
                pass  # an even newer failure took the name; this one may go
        remove_tree(trash)
        removed += 1
    return removed


def stale_tmp(spool: Spool, now: float, grace: float) -> list[SpoolItem]:
    """``tmp/`` leftovers :meth:`spool.Spool.clean_tmp` would remove at ``now`` (for dry runs)."""
    items = []
    try:
        paths = sorted(spool.tmp.iterdir())
    except FileNotFoundError:
        return []
    for path in paths:
        try:
            newest = max([os.lstat(path).st_mtime] +
                         ([p.lstat().st_mtime for p in path.iterdir()] if path.is_dir() else []))
        except OSError:
            continue
        if path.name.startswith(".trash-") or now - newest > grace:
            items.append(SpoolItem(path, newest))
    return items


class PendingRequests:
    """``pending(cid)``: is a publish or stamp request for ``cid`` queued or being handled?

    Such a request is a use of the CID that no repository shows yet: a publisher that found the
    CID present stamps it only after its transaction, and the janitor may be holding that very
    transaction's lock. A few ``lstat`` calls per question (no directory listing).
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def __call__(self, cid: str) -> bool:
        """True when ``incoming/`` or any ``active/<repo>/`` holds a request for ``cid``."""
        publish = entry_name(cid, Kind.PUBLISH)
        names = (publish, entry_name(cid, Kind.STAMP), *(publish + s for s in TAR_SUFFIXES))
        dirs = [str(self.spool.incoming)]
        try:
            with os.scandir(self.spool.active) as it:
                dirs += [d.path for d in it if d.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            pass
        lexists = os.path.lexists
        return any(lexists(f"{d}/{name}") for d in dirs for name in names)
