"""Every rule about what a tar member may be and where it may go: the one copy, for every backend.

A backend (the unpacker writing a directory, the cvmfs-native tree builder, the stream fed to
``cvmfs_server ingest``) asks :class:`MemberRules` about each member in archive order, then
does what the answer says; the rules keep the kinds of the entries created so far, so they
judge the archive exactly as the backend's storage will look. Each violation raises
:class:`UnpackError` naming the member.

* names: no absolute paths, no ``..`` components, no NUL; names and link targets are valid
  UTF-8 without control characters (C0, DEL, C1: e.g. newline); ``.`` and empty components
  are dropped; paths longer than PATH_MAX or components longer than 255 bytes are refused;
* symlinks are kept as GNU tar keeps them: any target, absolute or leading out of the CID
  directory, is stored as it is (a reader resolves it inside its own filesystem: a virtualenv's
  ``bin/python -> /usr/bin/python3`` works on the worker node); targets must be non-empty,
  valid UTF-8 without control characters and shorter than PATH_MAX;
* nothing is ever written *through* a symlink: nothing goes below a file or a symlink, a hard
  link points to a regular file created earlier from the same archive (never to a symlink),
  and no type change involves a directory; a later file, symlink or hard link with the name of
  an earlier one replaces it (tar semantics);
* the publisher's own top-level names (``.cvmfscatalog``, ``.publisher``) are reserved: members
  at or below them are dropped (the publisher writes its own);
* limits: ``max_members`` bounds the entries created (implied parent directories included),
  ``max_bytes`` the regular-file bytes;
* modes: files 0o644, or 0o755 if any exec bit was set; directories ``mode | 0o755``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from publisher.tarball.decompress import UnpackError
from publisher.tarball.stream import DIR, LNK, REG, SYM, Member, show

__all__ = ["RESERVED", "MemberRules", "Placement", "UnpackLimits", "UnpackStats",
           "check_symlink", "clean_path", "dir_mode", "file_mode"]

PATH_MAX = 4096
NAME_MAX = 255
_BAD_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_C1 = re.compile("[\x80-\x9f]")
#: Top-level names the publisher writes itself (the nested-catalog marker, the publisher record).
RESERVED = (b".cvmfscatalog", b".publisher")


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what one archive may create.

    *max_members* counts the entries created, implied parent directories included;
    *max_bytes* counts regular-file bytes (and, separately, pax header / long-name bytes).
    """

    max_members: int = 1_000_000
    max_bytes: int = 16 * 1024**3  # total unpacked bytes of regular files


@dataclass(frozen=True)
class UnpackStats:
    """What an archive created (duplicates that replaced earlier members included)."""

    compression: str  # "gzip" | "bzip2" | "xz" | "zstd" | "none"
    files: int
    directories: int
    symlinks: int
    hardlinks: int
    bytes: int  # unpacked bytes of regular files


def fail(member: bytes, reason: str) -> UnpackError:
    """The error for ``member`` (raw archive name) with a one-line ``reason``."""
    return UnpackError(f"member {show(member)}: {reason}")


def _char_problem(raw: bytes) -> str | None:
    if b"\0" in raw:
        return "contains a NUL byte"
    if _BAD_BYTES.search(raw):
        return "contains a control character"
    if not raw.isascii():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "is not valid UTF-8"
        if _C1.search(text):
            return "contains a control character"
    return None


def clean_path(raw: bytes, member: bytes, root_len: int, what: str = "path") -> bytes:
    """The normalised relative path of the archive name *raw*, or UnpackError.

    *root_len* is the length of the directory it goes below (for the PATH_MAX check);
    *member* names the member in messages; *what* is "path" or "hard link target".
    """
    if not raw.isascii() or _BAD_BYTES.search(raw):
        problem = _char_problem(raw)
        if problem:
            raise fail(member, f"{what} {problem}")
    if raw[:1] == b"/":
        raise fail(member, f"absolute {what}" if what == "path" else f"{what} is absolute")
    parts = raw.split(b"/")
    if b".." in parts:
        raise fail(member, f"{what} escapes the CID directory")
    if b"" in parts or b"." in parts:
        parts = [p for p in parts if p and p != b"."]
        raw = b"/".join(parts)
    if len(raw) > NAME_MAX:
        if len(raw) + root_len >= PATH_MAX:
            raise fail(member, f"{what} too long ({len(raw)} bytes)")
        if max(map(len, parts)) > NAME_MAX:
            raise fail(member, f"{what} has a component longer than {NAME_MAX} bytes")
    return raw


def check_symlink(member: bytes, target: bytes) -> None:
    """Check the target of a symlink; UnpackError if it cannot be stored.

    Where it points does not matter (it is resolved on the reader's side); what it is made of
    does: the tools that list and publish the tree must be able to handle it.
    """
    problem = "is empty" if not target else _char_problem(target)
    if problem:
        raise fail(member, f"symlink target {problem}")
    if len(target) >= PATH_MAX:
        raise fail(member, "symlink target too long")


def file_mode(mode: int) -> int:
    """The mode a regular file gets: 0o755 if any exec bit was set, else 0o644."""
    return 0o755 if mode & 0o111 else 0o644


def dir_mode(mode: int) -> int:
    """The mode a directory gets: its permission bits, at least 0o755 (no special bits)."""
    return (mode & 0o777) | 0o755


@dataclass(frozen=True)
class Placement:
    """Where a member goes and what must happen first.

    *replaces*: an earlier file, symlink or hard link at *rel* must be removed first;
    *parents*: directories to create first (outermost first), implied by the name;
    *target*: the symlink target (raw) or the cleaned path of a hard link's file.
    """

    rel: bytes
    replaces: bool = False
    parents: tuple[bytes, ...] = ()
    target: bytes = b""


@dataclass
class MemberRules:
    """The judge of one archive; see the module docstring for the rules.

    *root_len* is the length of the path the CID directory will have where readers see it
    (for the PATH_MAX check). Call the method for each member's kind in archive order, act
    on its :class:`Placement` (None: nothing to do), then read :meth:`directory_modes`.
    """

    root_len: int
    limits: UnpackLimits = field(default_factory=UnpackLimits)
    kinds: dict[bytes, str] = field(default_factory=lambda: {b"": DIR})
    entries: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    nbytes: int = 0
    _dir_meta: dict[bytes, tuple[int, int]] = field(default_factory=dict)

    def clean(self, raw: bytes, member: bytes, what: str = "path") -> bytes:
        """The normalised relative path of ``raw``, or UnpackError."""
        return clean_path(raw, member, self.root_len, what)

    def _count(self, member: bytes) -> None:
        self.entries += 1
        if self.entries > self.limits.max_members:
            raise fail(member, f"too many members (more than {self.limits.max_members})")

    def _place(self, rel: bytes, member: bytes, kind: str, target: bytes = b"") -> Placement:
        kinds = self.kinds
        old = kinds.get(rel)
        if old is not None:
            if DIR in (old, kind):
                raise fail(member, f"would replace a {old} with a {kind}")
            kinds[rel] = kind
            return Placement(rel, replaces=True, target=target)
        self._count(member)
        parent = rel.rpartition(b"/")[0]
        missing: list[bytes] = []
        while parent:
            k = kinds.get(parent)
            if k == DIR:
                break
            if k is not None:
                raise fail(member, f"path goes through a {k} {show(parent)}")
            missing.append(parent)
            parent = parent.rpartition(b"/")[0]
        for p in reversed(missing):
            self._count(member)
            kinds[p] = DIR
            self.directories += 1
        kinds[rel] = kind
        return Placement(rel, parents=tuple(reversed(missing)), target=target)

    @staticmethod
    def reserved(rel: bytes) -> bool:
        """True for the publisher's own top-level names and anything below them."""
        return rel.partition(b"/")[0] in RESERVED

    def file(self, m: Member) -> Placement | None:
        """A regular file of ``m.size`` bytes (None: dropped, its data is to be skipped)."""
        rel = self.clean(m.name, m.name)
        if not rel:
            raise fail(m.name, "a file cannot replace the CID directory")
        if self.reserved(rel):
            return None
        if self.nbytes + m.size > self.limits.max_bytes:
            raise fail(m.name, f"unpacked size exceeds the limit of {self.limits.max_bytes} bytes")
        self.nbytes += m.size
        placed = self._place(rel, m.name, REG)
        self.files += 1
        return placed

    def directory(self, m: Member) -> Placement | None:
        """A directory; None when it exists already (its mode and mtime are still recorded) or
        its name is reserved."""
        rel = self.clean(m.name, m.name)
        if self.reserved(rel):
            return None
        placed = None
        if self.kinds.get(rel) != DIR:
            placed = self._place(rel, m.name, DIR)
            self.directories += 1
        self._dir_meta[rel] = (m.mode, m.mtime_ns)
        return placed

    def symlink(self, m: Member) -> Placement | None:
        """A symlink; the placement's target is the raw target to create (None: dropped)."""
        rel = self.clean(m.name, m.name)
        if not rel:
            raise fail(m.name, "a symlink cannot replace the CID directory")
        check_symlink(m.name, m.linkname)
        if self.reserved(rel):
            return None
        placed = self._place(rel, m.name, SYM, m.linkname)
        self.symlinks += 1
        return placed

    def hardlink(self, m: Member) -> Placement | None:
        """A hard link; the placement's target is the cleaned path of the file it links to
        (None: dropped)."""
        rel = self.clean(m.name, m.name)
        if self.reserved(rel):
            return None
        if not m.linkname:
            raise fail(m.name, "hard link target is empty")
        target = self.clean(m.linkname, m.name, "hard link target")
        if self.kinds.get(target) != REG:
            raise fail(m.name, f"hard link target {show(m.linkname)} is not a file extracted "
                               "earlier")
        if target == rel:
            raise fail(m.name, "hard link to itself")
        placed = self._place(rel, m.name, LNK, target)
        self.kinds[rel] = REG  # a hard link is a file from now on (it may be linked to)
        self.hardlinks += 1
        return placed

    def directory_modes(self) -> Iterator[tuple[bytes, int, int | None]]:
        """(path, final mode, mtime or None) of every directory the archive described."""
        for rel, (mode, mtime) in self._dir_meta.items():
            if self.kinds.get(rel) == DIR:
                yield rel, dir_mode(mode), mtime

    def stats(self, compression: str) -> UnpackStats:
        """What the archive created, in the unpacker's terms."""
        return UnpackStats(compression=compression, files=self.files,
                           directories=self.directories, symlinks=self.symlinks,
                           hardlinks=self.hardlinks, bytes=self.nbytes)
