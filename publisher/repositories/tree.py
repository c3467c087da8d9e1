"""Reading a published tree: ``<root>/<prefix>/<cid>`` with stamps in ``<root>/<stamps>/<cid>``.

Shared by the local backend, cvmfs-server mounts and stratum-1 replicas (``/cvmfs2/<repo>``):
they all look the same to a reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from userpub.fsutil import tree_size
from userpub_client.cid import is_valid_cid

PUBLISHER_RECORD = ".publisher"
CATALOG_MARKER = ".cvmfscatalog"


class TreeReader:
    """Read-only view of a repository laid out as a directory tree."""

    def __init__(self, name: str, root: Path, prefix: str, stamps: str, mount: str, *,
                 staleness: Callable[[], float | None] | None = None) -> None:
        self.name = name
        self._staleness = staleness
        self.root = root
        self.prefix = prefix
        self.stamps_dir = root / stamps
        self.cid_dir = root / prefix
        self.mount = mount.rstrip("/")

    def path_of(self, cid: str) -> Path:
        """The directory of ``cid`` in this tree."""
        return self.cid_dir / cid

    def contains(self, cid: str) -> bool:
        """True when ``cid`` is published here."""
        return os.path.isdir(self.cid_dir / cid)

    def published_at(self, cid: str) -> float | None:
        """Publish time: the publisher record's mtime (the directory's if there is none)."""
        base = self.cid_dir / cid
        for path in (base / PUBLISHER_RECORD, base):
            try:
                return os.stat(path).st_mtime
            except OSError:
                continue
        return None

    def stamped_at(self, cid: str) -> float | None:
        """The stamp's mtime, or None."""
        try:
            return os.stat(self.stamps_dir / cid).st_mtime
        except OSError:
            return None

    def cids(self) -> Iterator[str]:
        """Published CIDs (one or two path components)."""
        yield from _walk_cids(self.cid_dir, directories=True)

    def stamps(self) -> Iterator[str]:
        """CIDs that have a stamp file here."""
        yield from _walk_cids(self.stamps_dir, directories=False)

    def visible_path(self, cid: str) -> str:
        """``<mount>/<prefix>/<cid>``."""
        return f"{self.mount}/{self.prefix}/{cid}"

    def staleness(self) -> float | None:
        """A replica's age as ``staleness`` reports it; None for a tree read in place as its
        own origin (a shared or mounted directory)."""
        return self._staleness() if self._staleness is not None else None

    def unreadable(self) -> str | None:
        """Why the tree cannot be read (its CID directory is missing), or None."""
        if self.cid_dir.is_dir():
            return None
        return f"{self.cid_dir} is not a directory (not mounted, or never published into)"

    def size_of(self, cid: str) -> int:
        """Apparent size of the CID's files."""
        return tree_size(self.cid_dir / cid)


def _walk_cids(top: Path, *, directories: bool) -> Iterator[str]:
    """Names under ``top`` that are CIDs: ``x`` or ``group/x`` (skipping hidden names).

    A first-level directory that itself holds a publisher record is a one-part CID; any
    other first-level directory is a group whose children are CIDs.
    """
    try:
        first = sorted(os.scandir(top), key=lambda d: d.name)
    except FileNotFoundError:
        return
    for de in first:
        if de.name.startswith("."):
            continue
        is_dir = de.is_dir(follow_symlinks=False)
        if not is_dir:
            if not directories and is_valid_cid(de.name):
                yield de.name
            continue
        if directories and os.path.lexists(os.path.join(de.path, PUBLISHER_RECORD)):
            yield de.name
            continue
        for child in sorted(os.listdir(de.path)):
            if child.startswith("."):
                continue
            cid = f"{de.name}/{child}"
            full = os.path.join(de.path, child)
            if directories == os.path.isdir(full) and is_valid_cid(cid):
                yield cid
