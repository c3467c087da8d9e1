"""The durable queue on disk: a Maildir-style state machine where every change is one rename.

::

    tmp/<id>/                being written; removed by clean_tmp() after a grace period
      -> incoming/<name>      complete and durable (payload and meta.json fsynced first)
      -> active/<repo>/<name> claimed by the publisher holding <repo>'s lock
      -> removed after publish, or -> failed/<name>/ with reason.json

``<name>`` is the percent-encoded CID (see :mod:`userpub_client.cid`), plus ``@stamp`` for access
stamps. Because a name is derived from the CID, the same CID can be waiting only once: a
second drop finds the name taken (rename without replace) and is answered as a duplicate.
An operator may also move a plain tarball into ``incoming/``, named by its encoded CID and
an optional tar suffix; it is published the same way.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from spool.digest import CidMismatch, cid_mismatch
from spool.names import Kind, decode_name, encode_name, is_ignored_name, split_tar_suffix
from userpub.checks import directory_problem
from userpub.fsutil import fsync_dir, remove_tree, rename_noreplace, unique_id
from userpub_client.cid import InvalidCid, cid_digest, validate_cid

STAMP_SUFFIX = "@stamp"
NAME_MAX = 255  # bytes in one file name (Linux filesystems)
PAYLOAD = "payload"
META = "meta.json"
REASON = "reason.json"


class DropResult(enum.Enum):
    """The answer to a drop."""

    QUEUED = "queued"
    DUPLICATE = "duplicate"  # the same CID (and kind) is already waiting


class State(enum.Enum):
    """Where a CID stands in the spool."""

    QUEUED = "queued"
    PUBLISHING = "publishing"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CidStatus:
    """The spool's view of one CID (``reason`` is set for FAILED)."""

    state: State
    reason: str = ""


@dataclass(frozen=True)
class Entry:
    """One queued request, wherever it currently sits."""

    path: Path
    cid: str
    kind: Kind
    submitter: str
    queued_at: float
    size: int
    digests: Mapping[str, str] = field(default_factory=dict)  # algorithm -> hex, if recorded

    @property
    def name(self) -> str:
        """The entry's file name (the same in every state)."""
        return self.path.name

    @property
    def payload(self) -> Path:
        """The tarball (for a plain-file entry, the entry itself)."""
        return self.path / PAYLOAD if self.path.is_dir() else self.path


@dataclass(frozen=True)
class Depth:
    """Queue depth by state, read from the directories."""

    incoming: int
    active: dict[str, int]
    failed: int
    oldest_incoming_age: float


class BadEntry(Exception):  # noqa: N818 (an entry that is bad, as operators say)
    """An entry whose name or metadata cannot be understood; it belongs in failed/."""


def entry_name(cid: str, kind: Kind) -> str:
    """The spool name of a request for ``cid``: its percent-encoded CID (plus ``@stamp``).

    A valid CID has up to 255 characters and each special one takes three in its encoding,
    so a name could exceed what one file name may hold (NAME_MAX, 255 bytes): such a name is
    cut and ends with ``%%`` and the CID's sha256 instead. It is still derived from the CID
    alone (a CID waits only once), but it does not decode: the entry's meta.json names its CID.
    """
    suffix = STAMP_SUFFIX if kind is Kind.STAMP else ""
    name = encode_name(cid)
    if len(name) + len(suffix) > NAME_MAX:
        digest = hashlib.sha256(cid.encode()).hexdigest()
        name = name[: NAME_MAX - len(suffix) - len(digest) - 2] + "%%" + digest
    return name + suffix


def parse_name(name: str) -> tuple[str, Kind]:
    """The CID and kind encoded in a spool name; BadEntry if it is not one."""
    kind = Kind.PUBLISH
    if name.endswith(STAMP_SUFFIX):
        name, kind = name[: -len(STAMP_SUFFIX)], Kind.STAMP
    else:
        name, _ = split_tar_suffix(name)
    try:
        return decode_name(name), kind
    except InvalidCid as err:
        raise BadEntry(f"spool name {name!r}: {err}") from None


class Spool:
    """The spool directory of one host; safe to share between processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.incoming = root / "incoming"
        self.active = root / "active"
        self.failed = root / "failed"

    def ensure_layout(self, repositories: tuple[str, ...] = ()) -> None:
        """Create the state directories (idempotent)."""
        for d in (self.tmp, self.incoming, self.active, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        for repo in repositories:
            (self.active / repo).mkdir(exist_ok=True)

    def layout_problems(self, repositories: tuple[str, ...] = (), *, create: bool) -> list[str]:
        """Why the spool cannot be used (one line each); with ``create``, the missing
        directories are made (the startup check of every daemon that writes the spool)."""
        problem = directory_problem(self.root, "spool", create=create)
        if problem is not None or not self.root.is_dir():
            return [problem] if problem else []
        dirs = [self.tmp, self.incoming, self.active, self.failed]
        if self.active.is_dir() or create:
            dirs += [self.active / repo for repo in repositories]
        found = (directory_problem(d, "spool", create=create) for d in dirs)
        return [p for p in found if p is not None]

    # -- writing ---------------------------------------------------------------------------

    def writer(self, cid: str, submitter: str, kind: Kind = Kind.PUBLISH,
               digests: Iterable[str] | None = None) -> EntryWriter:
        """Start a new entry in tmp/; write the payload, then commit() or discard().

        ``digests`` names the hashes of the payload to compute and record in the entry's
        metadata (default: the one the CID names, else sha256): one hash per upload.
        """
        return EntryWriter(self, validate_cid(cid), submitter, kind, digests)

    def drop_file(self, source: Path, cid: str | None, submitter: str) -> tuple[str, DropResult]:
        """Copy the tarball ``source`` into the spool; the CID defaults to its sha256.

        A CID naming a hash (:func:`cid_digest`) must be the tarball's: CidMismatch if not.
        """
        with self.writer(cid or "pending", submitter,
                         digests=None if cid else ["sha256"]) as w, source.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                w.write(chunk)
            w.cid = validate_cid(cid or w.sha256)
            w.check_cid()
            return w.cid, w.commit()

    def drop_stamp(self, cid: str, submitter: str) -> DropResult:
        """Queue an access stamp for ``cid`` (coalesced with one already waiting)."""
        with self.writer(cid, submitter, Kind.STAMP) as w:
            return w.commit()

    # -- reading ---------------------------------------------------------------------------

    def read_entry(self, path: Path) -> Entry:
        """Read an entry at ``path`` (any state); BadEntry if unreadable."""
        st = os.lstat(path)
        if path.is_dir():
            try:
                meta = json.loads((path / META).read_text())
                digests = {name: str(meta[name]) for name in ("sha256", "sha1") if name in meta}
                return Entry(path, validate_cid(meta["cid"]), Kind(meta["kind"]),
                             str(meta.get("submitter", "")), float(meta["queued_at"]),
                             int(meta.get("size", 0)), digests)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise BadEntry(f"unreadable metadata in {path.name}: {err}") from None
        cid, kind = parse_name(path.name)
        if not path.is_file():
            raise BadEntry(f"{path.name} is neither a tarball nor an entry directory")
        return Entry(path, cid, kind, f"operator (uid {st.st_uid})", st.st_ctime, st.st_size)

    def list_incoming(self) -> list[Path]:
        """Waiting entries, oldest first (by the time they arrived in incoming/)."""
        found: list[tuple[float, str]] = []
        with os.scandir(self.incoming) as it:
            for de in it:
                if is_ignored_name(de.name):
                    continue
                try:
                    found.append((de.stat(follow_symlinks=False).st_ctime, de.name))
                except FileNotFoundError:
                    continue
        found.sort()
        return [self.incoming / name for _, name in found]

    def iter_active(self, repo: str) -> Iterator[Path]:
        """Entries claimed by ``repo``'s publisher."""
        d = self.active / repo
        if d.is_dir():
            yield from sorted(p for p in d.iterdir() if not is_ignored_name(p.name))

    # -- transitions -----------------------------------------------------------------------

    def claim(self, path: Path, repo: str) -> Path | None:
        """Move an incoming entry to active/<repo>/; None if another publisher was faster."""
        target = self.active / repo / path.name
        try:
            rename_noreplace(path, target)
        except FileNotFoundError:
            return None
        except FileExistsError:
            # A stale twin in active/ (only possible after a crash): keep the newer one.
            self._trash(target)
            rename_noreplace(path, target)
        return target

    def complete(self, entry: Entry) -> None:
        """The entry is done: remove it (rename out of sight first, then delete)."""
        self._trash(entry.path)

    def release(self, entry: Entry) -> None:
        """Return a claimed entry to incoming/ (to be retried)."""
        try:
            rename_noreplace(entry.path, self.incoming / entry.name)
        except FileExistsError:
            self._trash(entry.path)  # the same CID was dropped again meanwhile; keep that one

    def fail(self, entry: Entry | Path, reason: str) -> Path:
        """Move an entry to failed/ with a reason.json; replaces an older failure of the CID."""
        path = entry.path if isinstance(entry, Entry) else entry
        cid, submitter = (entry.cid, entry.submitter) if isinstance(entry, Entry) else ("", "")
        if not cid:
            try:
                cid = parse_name(path.name)[0]
            except BadEntry:
                cid = ""
        original: Path | None = None
        if not path.is_dir():
            # A plain file (an operator's drop) gets a directory; its payload is a hard link,
            # and the file leaves its place only once failed/ holds it: a crash in between
            # leaves the entry to be retried, not lost in tmp/.
            holder = self.tmp / unique_id()
            holder.mkdir()
            os.link(path, holder / PAYLOAD, follow_symlinks=False)
            original, path = path, holder
        record = {"cid": cid, "error": reason, "time": time.time(), "submitter": submitter}
        _write_json(path / REASON, record)
        fsync_dir(path)
        target = self.failed / (entry_name(cid, Kind.PUBLISH) if cid else path.name)
        while True:
            try:
                rename_noreplace(path, target)
                break
            except FileExistsError:
                self._trash(target)
        fsync_dir(self.failed)
        if original is not None:
            os.unlink(original)
        return target

    def recover(self, repo: str) -> int:
        """Return ``repo``'s claimed entries to incoming/ (call while holding repo's lock)."""
        count = 0
        for path in list(self.iter_active(repo)):
            try:
                entry = self.read_entry(path)
            except BadEntry as err:
                self.fail(path, str(err))
                continue
            self.release(entry)
            count += 1
        return count

    def clean_tmp(self, grace_seconds: float, now: float | None = None) -> int:
        """Remove tmp/ leftovers untouched for ``grace_seconds`` (and trash at once)."""
        now = time.time() if now is None else now
        removed = 0
        for path in list(self.tmp.iterdir()):
            try:
                newest = max([os.lstat(path).st_mtime] +
                             ([p.stat().st_mtime for p in path.iterdir()] if path.is_dir() else []))
            except FileNotFoundError:
                continue
            if path.name.startswith(".trash-") or now - newest > grace_seconds:
                remove_tree(path)
                removed += 1
        return removed

    # -- questions -------------------------------------------------------------------------

    def status(self, cid: str) -> CidStatus:
        """Where ``cid`` stands: queued, publishing, failed (with reason) or unknown."""
        name = entry_name(cid, Kind.PUBLISH)
        if self._has(self.incoming, name):
            return CidStatus(State.QUEUED)
        if self.is_active(name) or (self.active.is_dir() and any(
                self._has(repo_dir, name) for repo_dir in self.active.iterdir())):
            return CidStatus(State.PUBLISHING)
        failed = self.failed / name
        if failed.is_dir():
            try:
                reason = json.loads((failed / REASON).read_text())["error"]
            except (OSError, ValueError, KeyError):
                reason = "failed (reason unreadable)"
            return CidStatus(State.FAILED, str(reason))
        return CidStatus(State.UNKNOWN)

    def depth(self, now: float | None = None) -> Depth:
        """Counts of incoming, active (per repository) and failed entries."""
        now = time.time() if now is None else now
        incoming = self.list_incoming()
        oldest = 0.0
        if incoming:
            try:
                oldest = max(0.0, now - os.lstat(incoming[0]).st_ctime)
            except FileNotFoundError:
                oldest = 0.0
        active = {d.name: sum(1 for _ in self.iter_active(d.name))
                  for d in self.active.iterdir() if d.is_dir()} if self.active.is_dir() else {}
        failed = sum(1 for p in self.failed.iterdir() if not is_ignored_name(p.name)) \
            if self.failed.is_dir() else 0
        return Depth(len(incoming), active, failed, oldest)

    def is_active(self, name: str) -> bool:
        """True when an entry called ``name`` is claimed by some publisher."""
        try:
            repos = os.listdir(self.active)
        except FileNotFoundError:
            return False
        return any(os.path.lexists(self.active / repo / name) for repo in repos)

    # -- internals -------------------------------------------------------------------------

    def _has(self, directory: Path, name: str) -> bool:
        if os.path.lexists(directory / name):
            return True
        # operator drops may carry a tar suffix
        try:
            with os.scandir(directory) as it:
                return any(de.name.startswith(name) and split_tar_suffix(de.name)[0] == name
                           for de in it)
        except FileNotFoundError:
            return False

    def _trash(self, path: Path) -> None:
        trash = self.tmp / f".trash-{unique_id()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        remove_tree(trash)


class EntryWriter:
    """Writes one entry in tmp/ and makes it visible in incoming/ with one rename."""

    def __init__(self, spool: Spool, cid: str, submitter: str, kind: Kind,
                 digests: Iterable[str] | None = None) -> None:
        self.spool = spool
        self.cid = cid
        self.submitter = submitter
        self.kind = kind
        self.dir = spool.tmp / unique_id()
        self.dir.mkdir()
        self.size = 0
        if digests is None:
            named = cid_digest(cid)
            digests = [named[0] if named else "sha256"]
        self._hashes = {name: hashlib.new(name) for name in digests}
        self._fd: int | None = None
        if kind is Kind.PUBLISH:
            self._fd = os.open(self.dir / PAYLOAD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: bytes | memoryview) -> None:
        """Append payload bytes."""
        assert self._fd is not None, "stamps carry no payload"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        for hasher in self._hashes.values():
            hasher.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the payload written so far (when it is computed)."""
        return self.digest("sha256")

    def digest(self, algorithm: str) -> str:
        """Hex digest of the payload written so far (a hash asked for at the start)."""
        return self._hashes[algorithm].hexdigest()

    def check_cid(self) -> None:
        """CidMismatch when the CID names a hash (:func:`cid_digest`) the payload has not."""
        named = cid_digest(self.cid)
        if named is not None and self.kind is Kind.PUBLISH:
            algorithm, expected = named
            if algorithm not in self._hashes:
                raise ValueError(f"the writer of {self.cid} does not compute its {algorithm}")
            got = self.digest(algorithm)
            if got != expected:
                raise CidMismatch(cid_mismatch(algorithm, expected, got))

    def commit(self) -> DropResult:
        """Make the entry durable and visible; DUPLICATE (nothing kept) if queued or publishing."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        meta: dict[str, object] = {
            "cid": validate_cid(self.cid), "kind": self.kind.value, "submitter": self.submitter,
            "size": self.size, "queued_at": time.time()}
        if self.kind is Kind.PUBLISH:
            meta.update((name, hasher.hexdigest()) for name, hasher in self._hashes.items())
        name = entry_name(self.cid, self.kind)
        if self.spool.is_active(name):
            self.discard()  # being published right now: the same CID is not queued twice
            return DropResult.DUPLICATE
        _write_json(self.dir / META, meta)
        fsync_dir(self.dir)
        try:
            rename_noreplace(self.dir, self.spool.incoming / name)
        except FileExistsError:
            self.discard()
            return DropResult.DUPLICATE
        fsync_dir(self.spool.incoming)
        return DropResult.QUEUED

    def discard(self) -> None:
        """Throw the unfinished entry away."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        remove_tree(self.dir)

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if os.path.lexists(self.dir):
            self.discard()


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(data, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
