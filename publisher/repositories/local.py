"""The ``local`` backend: a plain directory tree, each CID published by one atomic rename.

A transaction unpacks every CID into a hidden staging directory on the same filesystem
(``<root>/.userpub/staging/<txn>/``); on commit it optionally flushes the filesystem once
(``durable``) and renames each staged tree to ``<root>/<prefix>/<cid>``. A reader therefore
sees a CID either absent or complete. Removals rename a CID into ``.userpub/trash/`` (gone
at once, atomically) and ``gc()`` deletes the trash later, when the disk is quiet: on this
ext4 without a journal, creating files soon after a mass delete is many times slower.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from publisher.repositories.base import GcResult, RemoveResult, RepositoryError
from publisher.repositories.tree import CATALOG_MARKER, PUBLISHER_RECORD, TreeReader
from publisher.tarball import UnpackLimits, UnpackStats
from publisher.tarball.unpack import unpack
from userpub.fsutil import (
    fsync_dir,
    remove_tree,
    rename_noreplace,
    syncfs,
    tree_size,
    unique_id,
    write_new_file,
)

log = logging.getLogger("userpub.repository.local")

WORK_DIR = ".userpub"


class LocalRepository(TreeReader):
    """A repository that is a directory on this host."""

    gc_needs_lock = False  # gc deletes the trash, which nothing can see

    def __init__(self, name: str, root: Path, prefix: str, stamps: str, mount: str,
                 *, durable: bool = True) -> None:
        super().__init__(name, root, prefix, stamps, mount)
        self.durable = durable
        self.work = root / WORK_DIR
        self.staging = self.work / "staging"
        self.trash = self.work / "trash"
        self._last_trash_clean = 0.0

    def ensure_layout(self) -> None:
        """Create the repository's directories inside its root (idempotent); RepositoryError
        if the root itself is missing: it is never made here (a repository disk that is not
        mounted must not be replaced by a tree on another disk)."""
        if not self.root.is_dir():
            raise RepositoryError(f"{self.name}: root {self.root} is not a directory "
                                  "(not mounted?)")
        for d in (self.cid_dir, self.stamps_dir, self.staging, self.trash):
            d.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def transaction(self) -> Iterator[LocalTransaction]:
        """Stage changes; publish them on clean exit, discard them on an exception."""
        self.ensure_layout()
        txn = LocalTransaction(self, self.staging / unique_id())
        try:
            yield txn
        except BaseException as err:
            txn.abort()
            if _out_of_space(err):
                # The aborted trees went to the trash, on this full disk: the retry would
                # fail again for want of the room they hold (idle() empties the trash only
                # after quiet minutes). Give it back now.
                self.gc()
            raise
        txn.commit()

    def recover(self) -> None:
        """Move staging leftovers of a crashed publisher to the trash, and remove the
        temporary files of stamps it was writing (``<stamps>/[group/].*.tmp``: no stamp is
        hidden, and no stamp is being written while the caller holds the lock)."""
        self.ensure_layout()
        for leftover in list(self.staging.iterdir()):
            log.warning("%s: discarding staging leftover %s", self.name, leftover.name)
            self.move_to_trash(leftover, "leftover")
        for pattern in (".*.tmp", "*/.*.tmp"):
            for tmp in self.stamps_dir.glob(pattern):
                log.warning("%s: removing the unfinished stamp %s", self.name, tmp.name)
                tmp.unlink(missing_ok=True)

    def move_to_trash(self, path: Path, label: str) -> None:
        """Take ``path`` out of sight at once; gc() deletes it later. ``label`` says what it
        was (``cid``, ``aborted``, ``removed``, ``leftover``), for whoever inspects the trash."""
        os.rename(path, self.trash / f"{unique_id()}.{label}")

    def gc(self) -> GcResult:
        """Delete the trash (nothing in it is visible: no lock needed), then flush."""
        start = time.monotonic()
        freed = 0
        for item in list(self.trash.iterdir()) if self.trash.is_dir() else []:
            freed += tree_size(item)
            remove_tree(item)
        with contextlib.suppress(OSError):
            syncfs(self.root)
        return GcResult(freed, time.monotonic() - start)

    def idle(self, seconds_idle: float) -> None:
        """After five quiet minutes, empty the trash (at most once an hour)."""
        now = time.monotonic()
        if seconds_idle >= 300 and now - self._last_trash_clean >= 3600:
            self._last_trash_clean = now
            if self.trash.is_dir() and any(self.trash.iterdir()):
                result = self.gc()
                log.info("%s: emptied trash, %d bytes", self.name, result.bytes_freed)


class LocalTransaction:
    """One batch of adds, stamps and removals of a :class:`LocalRepository`."""

    def __init__(self, repo: LocalRepository, staging: Path) -> None:
        self.repo = repo
        self.staging = staging
        self.staging.mkdir()
        self._staged: list[tuple[str, Path]] = []
        self._stamps: dict[str, str] = {}

    def add(self, cid: str, payload: Path, submitter: str, limits: UnpackLimits) -> UnpackStats:
        """Unpack ``payload`` into staging; visible only after commit."""
        dest = self.staging / str(len(self._staged))
        try:
            stats = unpack(payload, dest, limits)
        except BaseException:
            if dest.exists():
                self.repo.move_to_trash(dest, "cid")
            raise
        write_new_file(dest / CATALOG_MARKER)  # reserved names: the rules dropped the user's
        write_new_file(dest / PUBLISHER_RECORD, f"{submitter}\n".encode())
        self._staged.append((cid, dest))
        return stats

    def stamp(self, cids: Iterable[str], who: str) -> None:
        """Stamp these CIDs at commit time."""
        for cid in cids:
            self._stamps[cid] = who

    def remove(self, cids: Iterable[str], stamps: Iterable[str] = ()) -> RemoveResult:
        """Remove CIDs (moved to the trash: gone for readers at once) and stamps."""
        removed = removed_stamps = freed = 0
        for cid in cids:
            path = self.repo.path_of(cid)
            if not path.is_dir():
                continue
            freed += tree_size(path)
            _make_movable(path, self.repo.cid_dir)
            self.repo.move_to_trash(path, "removed")
            removed += 1
            parent = path.parent
            if parent != self.repo.cid_dir:
                _remove_if_empty(parent)
        for cid in stamps:
            stamp = self.repo.stamps_dir / cid
            try:
                stamp.unlink()
            except FileNotFoundError:
                continue
            removed_stamps += 1
            if stamp.parent != self.repo.stamps_dir:
                _remove_if_empty(stamp.parent)
        return RemoveResult(removed, removed_stamps, freed)

    def commit(self) -> None:
        """Publish: flush once, then one rename per CID; write stamps.

        Everything that can fail for a reason of its own (a group directory that cannot be
        made, a full disk while flushing) happens before the first rename, so a failed commit
        leaves nothing visible; the renames themselves only fail if the filesystem does.
        """
        repo = self.repo
        try:
            for cid, _ in self._staged:
                repo.path_of(cid).parent.mkdir(parents=True, exist_ok=True)
            if self._staged and repo.durable:
                syncfs(self.staging)
            parents: set[Path] = set()
            for cid, staged in self._staged:
                final = repo.path_of(cid)
                try:
                    rename_noreplace(staged, final)
                except FileExistsError:
                    log.info("%s: %s was published meanwhile; keeping that copy", repo.name, cid)
                    repo.move_to_trash(staged, "cid")
                    continue
                parents.add(final.parent)
            for cid, who in self._stamps.items():
                _write_stamp(repo.stamps_dir / cid, who)
                parents.add((repo.stamps_dir / cid).parent)
            if repo.durable:
                for parent in parents:
                    fsync_dir(parent)
        except OSError as err:
            raise RepositoryError(f"publish into {repo.name} failed: {err}") from err
        finally:
            if any(self.staging.iterdir()):
                # Only an error can leave CID trees behind here; never anything else, since
                # nothing is ever written outside a CID directory.
                log.warning("%s: staging %s not empty after commit", repo.name, self.staging)
                repo.move_to_trash(self.staging, "leftover")
            else:
                self.staging.rmdir()

    def abort(self) -> None:
        """Discard everything staged."""
        if self.staging.exists():
            self.repo.move_to_trash(self.staging, "aborted")


def _write_stamp(path: Path, who: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # not named after the CID: a CID component may already be 255 bytes, a file name's limit
    tmp = path.with_name(f".stamp.{unique_id()}.tmp")
    tmp.write_text(f"{who}\n")
    os.replace(tmp, path)


def _out_of_space(err: BaseException | None) -> bool:
    """True if ``err`` (or an error it was raised from) is ENOSPC or EDQUOT."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__
    return False


def _make_movable(path: Path, cid_dir: Path) -> None:
    """Give the owner write access to a CID's directory (and its group directory).

    Moving a directory to another parent rewrites its ``..`` entry, which needs write access
    to the directory itself; read-only trees inside are handled by :meth:`LocalRepository.gc`.
    """
    for p in (path.parent, path) if path.parent != cid_dir else (path,):
        with contextlib.suppress(OSError):
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o700) != 0o700:
                os.chmod(p, stat.S_IMODE(st.st_mode) | 0o700)


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
