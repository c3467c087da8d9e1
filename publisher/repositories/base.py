"""The Repository protocol every backend implements, and what its methods return."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from publisher.tarball import UnpackLimits, UnpackStats
from userpub.errors import ServiceError


class RepositoryError(ServiceError):
    """The backend failed for reasons that are not the tarball's fault (disk, cvmfs_server...).

    Entries caught in such a failure are retried, not failed.
    """


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection reclaimed."""

    bytes_freed: int
    seconds: float


@dataclass(frozen=True)
class RemoveResult:
    """What a removal in a transaction took away."""

    cids: int
    stamps: int
    bytes_freed: int


class Transaction(Protocol):
    """Changes that become visible together when the transaction context exits cleanly."""

    def add(self, cid: str, payload: Path, submitter: str, limits: UnpackLimits) -> UnpackStats:
        """Unpack ``payload`` as ``cid``; UnpackError leaves the transaction usable."""

    def stamp(self, cids: Iterable[str], who: str) -> None:
        """Record that these CIDs were used again now."""

    def remove(self, cids: Iterable[str], stamps: Iterable[str] = ()) -> RemoveResult:
        """Remove published CIDs and stamps (``stamps``: CIDs whose stamp goes)."""


class RepositoryReader(Protocol):
    """The read-only view the catalog needs."""

    name: str

    def contains(self, cid: str) -> bool:
        """True when ``cid`` is published (fully) in this repository."""

    def published_at(self, cid: str) -> float | None:
        """When ``cid`` was published here, or None."""

    def stamped_at(self, cid: str) -> float | None:
        """The newest access stamp of ``cid`` kept in this repository, or None."""

    def cids(self) -> Iterator[str]:
        """Every published CID."""

    def stamps(self) -> Iterator[str]:
        """Every CID that has a stamp here."""

    def visible_path(self, cid: str) -> str:
        """Where worker nodes find ``cid`` (reported to clients)."""

    def size_of(self, cid: str) -> int:
        """Bytes of regular files under ``cid`` (0 if absent)."""

    def staleness(self) -> float | None:
        """Seconds since this copy last matched its origin (a replica's last successful pull;
        infinity if it never did); None for the origin itself."""

    def unreadable(self) -> str | None:
        """Why this copy cannot be read right now (not mounted, never published into), or
        None. Ages must not be judged on a copy that cannot be read: its stamps count."""


class Repository(RepositoryReader, Protocol):
    """A repository this host publishes into.

    ``gc_needs_lock`` is False when :meth:`gc` only deletes what no reader and no transaction
    can see any more (the local backend's trash), so it may run after the transaction lock is
    released and publishing goes on meanwhile.
    """

    gc_needs_lock: bool

    def transaction(self) -> AbstractContextManager[Transaction]:
        """Open a transaction: published on clean exit, aborted on an exception."""

    def recover(self) -> None:
        """Undo what a crashed publisher left behind (call while holding the lock)."""

    def gc(self) -> GcResult:
        """Reclaim the space of removed CIDs and aborted transactions."""

    def idle(self, seconds_idle: float) -> None:
        """Housekeeping a publisher may do while it has no work."""
