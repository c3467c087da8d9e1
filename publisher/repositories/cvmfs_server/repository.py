"""The ``cvmfs-server`` backend: publish through an installed ``cvmfs_server``, as the original.

Two views of one repository on a stratum-0 host:

* ``mount`` (``/cvmfs/<repo>``): cvmfs_server's union mount, writable only inside a
  transaction (an overlayfs whose upper layer is the scratch area). During a transaction it
  shows uncommitted changes to every process on this host, so nothing reads it to answer
  "is this CID published?". It is also the path worker nodes see (``visible_path``).
* ``root`` (default ``/var/spool/cvmfs/<repo>/rdonly``): cvmfs_server's read-only mount
  of the published revision. The reader methods (``contains``, ``cids``, stamps...) and
  the catalog use it, so a CID counts as published only after ``cvmfs_server publish``.

A batch is one transaction: ``transaction`` (when one is already open, left by a crash:
``abort -f`` and ``transaction`` again), each CID unpacked by the safe unpacker into a
hidden sibling (``.userpub-<id>``) and renamed to ``<prefix>/<cid>`` with ``.cvmfscatalog``
and ``.publisher`` (a bad tarball leaves nothing behind and the transaction goes on), stamps
and removals written, then ``publish``. On any error: ``abort -f`` and :class:`RepositoryError`, so the
publisher returns the entries to the queue. Every command runs through
:func:`run_command` (argument list, streamed output, timeout, process group killed).

With ``cvmfs_ingest = true`` each CID is instead streamed into ``cvmfs_server ingest -t - -b
<prefix>/<cid> -c`` (its own transaction and publish, see :mod:`cvmfs_ingest`); stamps and
removals of the batch still go in one ordinary transaction at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from publisher.repositories.base import GcResult, RemoveResult, RepositoryError
from publisher.repositories.cvmfs_server.ingest_stream import IngestStream
from publisher.repositories.cvmfs_server.subprocess_log import CommandResult, run_command
from publisher.repositories.tree import CATALOG_MARKER, PUBLISHER_RECORD, TreeReader
from publisher.tarball import UnpackError, UnpackLimits, UnpackStats
from publisher.tarball.unpack import unpack
from userpub.fsutil import remove_tree, rename_noreplace, tree_size, unique_id, write_new_file

log = logging.getLogger("userpub.repository.cvmfs_server")

COMMAND = "cvmfs_server"
PUBLISHED_VIEW = "/var/spool/cvmfs/{name}/rdonly"
_EEXIST, _EINVAL = 17, 22  # cvmfs_publish: transaction already open / abort without one


def default_published_view(name: str) -> Path:
    """Where cvmfs_server mounts the published revision of ``name`` read-only."""
    return Path(PUBLISHED_VIEW.format(name=name))


class CvmfsServerRepository(TreeReader):
    """A repository published by the ``cvmfs_server`` installed on this host."""

    gc_needs_lock = True  # cvmfs_server gc refuses to run inside a transaction

    def __init__(self, name: str, mount: Path, published: Path, prefix: str, stamps: str,
                 *, timeout: float, ingest: bool = False, command: str = COMMAND) -> None:
        super().__init__(name, published, prefix, stamps, str(mount))
        self.union = mount
        self.union_cids = mount / prefix
        self.union_stamps = mount / stamps
        self.timeout = timeout
        self.ingest = ingest
        self.command = command

    # -- running cvmfs_server --------------------------------------------------------------

    def run(self, *args: str, stdin: Iterable[bytes] | None = None,
            quiet: bool = False) -> CommandResult:
        """``cvmfs_server <args>`` with our timeout; RepositoryError if it cannot start.

        ``quiet``: log stderr at INFO (for commands whose failure is an expected answer).
        """
        program = shutil.which(self.command)
        if program is None:
            raise RepositoryError(f"{self.command} not found on PATH")
        try:
            return run_command([program, *args], timeout=self.timeout, log=log, stdin=stdin,
                               stderr_level=logging.INFO if quiet else logging.WARNING)
        except OSError as err:
            raise RepositoryError(f"cannot run {self.command} {' '.join(args)}: {err}") from err

    def require(self, *args: str) -> CommandResult:
        """Run a command that must succeed."""
        result = self.run(*args)
        if not result.ok:
            raise RepositoryError(result.describe())
        return result

    def begin(self) -> None:
        """``cvmfs_server transaction``; abort a stale open transaction and retry once."""
        result = self.run("transaction", self.name)
        if result.ok:
            return
        if _already_open(result):
            log.warning("%s: a transaction is already open (left by a crash?); aborting it",
                        self.name)
            self.abort()
            result = self.run("transaction", self.name)
            if result.ok:
                return
        raise RepositoryError(result.describe())

    def abort(self, *, quiet: bool = False) -> bool:
        """``cvmfs_server abort -f``: True if a transaction was aborted, False if none was open."""
        result = self.run("abort", "-f", self.name, quiet=quiet)
        if result.ok:
            return True
        if result.returncode == _EINVAL or "not in a transaction" in result.output():
            return False
        raise RepositoryError(result.describe())

    def publish(self) -> None:
        """``cvmfs_server publish``; on failure abort the transaction and raise."""
        result = self.run("publish", self.name)
        if not result.ok:
            self.abort_quietly()
            raise RepositoryError(result.describe())

    def abort_quietly(self) -> None:
        """Abort after a failure; a failing abort is logged, not raised (the first error wins)."""
        try:
            self.abort()
        except RepositoryError as err:
            log.error("%s: abort after a failure failed too: %s", self.name, err)

    # -- the Repository protocol -----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[CvmfsServerTransaction]:
        """One cvmfs_server transaction: published on clean exit, aborted on an exception."""
        txn = CvmfsServerTransaction(self)
        if not self.ingest:
            self.begin()
            txn.open = True
        try:
            yield txn
            txn.finish()
        except BaseException as err:
            if txn.open:
                self.abort_quietly()
            if isinstance(err, Exception) and not isinstance(err, RepositoryError | UnpackError):
                raise RepositoryError(f"{self.name}: transaction failed: {err}") from err
            raise
        finally:
            txn.open = False

    def recover(self) -> None:
        """Abort a transaction that a crashed publisher left open."""
        if self.abort(quiet=True):  # "not in a transaction" is the usual answer
            log.warning("%s: aborted a transaction left open by a previous publisher", self.name)

    def gc(self) -> GcResult:
        """``cvmfs_server gc -f``; the bytes it frees are not reported (0)."""
        start = time.monotonic()
        self.require("gc", "-f", self.name)
        return GcResult(0, time.monotonic() - start)

    def idle(self, seconds_idle: float) -> None:
        """Nothing to do: cvmfs_server collects garbage when the janitor asks."""


class CvmfsServerTransaction:
    """Adds, stamps and removals inside one ``cvmfs_server`` transaction."""

    def __init__(self, repo: CvmfsServerRepository) -> None:
        self.repo = repo
        self.open = False
        self._stamps: dict[str, str] = {}
        self._removals: list[str] = []
        self._stamp_removals: list[str] = []

    def add(self, cid: str, payload: Path, submitter: str, limits: UnpackLimits) -> UnpackStats:
        """Unpack ``payload`` as ``cid`` (visible after publish); UnpackError leaves no trace."""
        if self.repo.ingest:
            return self._ingest(cid, payload, submitter, limits)
        final = self.repo.union_cids / cid
        if not self.repo.union.is_dir():
            raise RepositoryError(f"{self.repo.name}: {self.repo.union} is not mounted")
        parent = final.parent
        made = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # not named after the CID: a CID component may already be 255 bytes long
            hidden = parent / f".userpub-{unique_id()}"
            try:
                stats = unpack(payload, hidden, limits)
                write_new_file(hidden / CATALOG_MARKER)  # the rules dropped the user's
                write_new_file(hidden / PUBLISHER_RECORD, f"{submitter}\n".encode())
            except BaseException:
                remove_tree(hidden)
                for directory in sorted(made, key=lambda p: len(p.parts), reverse=True):
                    _remove_if_empty(directory)
                raise
            try:
                rename_noreplace(hidden, final)
            except FileExistsError:
                log.info("%s: %s is already in the repository; keeping that copy",
                         self.repo.name, cid)
                remove_tree(hidden)
        except OSError as err:
            raise RepositoryError(f"{self.repo.name}: writing {cid} failed: {err}") from err
        return stats

    def stamp(self, cids: Iterable[str], who: str) -> None:
        """Record that these CIDs were used now (written before publish)."""
        for cid in cids:
            self._stamps[cid] = who
        if self.open:
            self._write_stamps()

    def remove(self, cids: Iterable[str], stamps: Iterable[str] = ()) -> RemoveResult:
        """Remove published CIDs and stamps (read-only directories included)."""
        cids, stamps = list(cids), list(stamps)
        freed = removed = removed_stamps = 0
        for cid in cids:
            published = self.repo.path_of(cid)
            if published.is_dir():
                freed += tree_size(published)
                removed += 1
        removed_stamps = sum(1 for cid in stamps if (self.repo.stamps_dir / cid).is_file())
        self._removals.extend(cids)
        self._stamp_removals.extend(stamps)
        if self.open:
            self._apply_removals()
        return RemoveResult(removed, removed_stamps, freed)

    def finish(self) -> None:
        """Write what was deferred (ingest mode opens its transaction only now) and publish."""
        repo = self.repo
        if not self.open:
            if not (self._stamps or self._removals or self._stamp_removals):
                return
            repo.begin()
            self.open = True
            self._write_stamps()
            self._apply_removals()
        self.open = False  # publish closes the transaction, or aborts it when it fails
        repo.publish()

    # -- inside the open transaction -------------------------------------------------------

    def _write_stamps(self) -> None:
        try:
            for cid, who in self._stamps.items():
                path = self.repo.union_stamps / cid
                path.parent.mkdir(parents=True, exist_ok=True)
                # not named after the CID, whose last component may be 255 bytes already
                tmp = path.with_name(f".stamp.{unique_id()}.tmp")
                tmp.write_text(f"{who}\n")
                os.replace(tmp, path)
        except OSError as err:
            raise RepositoryError(f"{self.repo.name}: writing stamps failed: {err}") from err
        self._stamps.clear()

    def _apply_removals(self) -> None:
        union = self.repo
        try:
            for cid in self._removals:
                path = union.union_cids / cid
                if os.path.lexists(path):
                    remove_tree(path)
                    if path.parent != union.union_cids:
                        _remove_if_empty(path.parent)
            for cid in self._stamp_removals:
                stamp = union.union_stamps / cid
                with contextlib.suppress(FileNotFoundError):
                    stamp.unlink()
                    if stamp.parent != union.union_stamps:
                        _remove_if_empty(stamp.parent)
        except OSError as err:
            raise RepositoryError(f"{union.name}: removing failed: {err}") from err
        self._removals.clear()
        self._stamp_removals.clear()

    def _ingest(self, cid: str, payload: Path, submitter: str,
                limits: UnpackLimits) -> UnpackStats:
        """Stream one CID into ``cvmfs_server ingest`` (its own transaction and publish)."""
        repo = self.repo
        if repo.contains(cid):
            log.info("%s: %s is already in the repository; keeping that copy", repo.name, cid)
            return _EMPTY
        base = f"{repo.prefix}/{cid}".rstrip("/")  # a trailing '/' breaks ingest (cvmfs #2818)
        stream = IngestStream(payload, submitter, limits,
                              os.fsencode(f"{repo.union}/{base}"))
        chunks = stream.chunks()
        with contextlib.closing(chunks):
            try:
                result = repo.run("ingest", "-t", "-", "-b", base, "-c", repo.name,
                                  stdin=chunks)
            except UnpackError:
                repo.abort_quietly()  # in case ingest left its transaction open
                raise
        if not result.ok:
            repo.abort_quietly()
            raise RepositoryError(result.describe())
        return stream.stats()


_EMPTY = UnpackStats("none", 0, 0, 0, 0, 0)


def _already_open(result: CommandResult) -> bool:
    """True when ``transaction`` failed because one is already open."""
    text = result.output().lower()
    return result.returncode == _EEXIST or ("already" in text and "transaction" in text)


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
