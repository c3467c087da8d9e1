"""Streaming, safe and fast extraction of a user's tarball into a fresh CID directory.

``unpack(source, dest)`` detects the compression from the content (gzip, bzip2, xz, zstd or
none), decompresses on another core (see :mod:`publisher.tarball.decompress`), parses the tar stream
with a lean parser (:mod:`publisher.tarball.stream`) and writes every member strictly below *dest*.

Safety rules (each violation raises :class:`UnpackError` naming the member):

* names: no absolute paths, no ``..`` components, no NUL. Names and link targets must be valid
  UTF-8 without control characters (C0, DEL, C1: e.g. newline); such archives are *rejected*
  rather than extracted, because these names break the tools that later list and publish the
  tree. ``.`` and empty components are dropped; ``./`` itself sets the mode/mtime of *dest*.
  Paths longer than PATH_MAX or components longer than 255 bytes are rejected.
* symlinks: targets must be relative and, resolved lexically from the link's directory, stay
  inside *dest*. Targets with ``..`` after a normal component are re-checked at the end by
  resolving them on disk, so chains of symlinks cannot escape either.
* hard links must point to a regular file extracted earlier from the same archive.
* devices, fifos, sparse files and other special members are rejected.
* nothing is ever written through a symlink: a member below a symlink or a file is rejected,
  files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and the set of created paths is tracked
  (*dest* must be new or empty, so it mirrors the disk). A later file, symlink or hard link with
  the name of an earlier one replaces it (tar semantics); any type change involving a directory
  is rejected.
* limits: ``max_members`` bounds the entries created (including implied parent directories);
  ``max_bytes`` bounds the regular-file bytes, checked against the declared size before
  writing and counted as written. Pax headers and long names are bounded as well.

Modes: files become 0o644, or 0o755 if any exec bit was set; directories ``mode | 0o755``
(applied at the end, so read-only directories in the archive do not block extraction).
setuid/setgid/sticky bits are dropped, owners are not restored. Member mtimes are restored on
files, symlinks and (at the end) directories.
"""

from __future__ import annotations

import os
import queue
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from publisher.tarball.decompress import UnpackError, detect_compression, open_chunks
from publisher.tarball.stream import DIR, LNK, REG, SYM, Member, TarReader, show

__all__ = ["UnpackError", "UnpackLimits", "UnpackStats", "check_symlink", "clean_path",
           "detect_compression", "unpack"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_BIG = 256 * 1024  # file bodies at least this large are written by the writer thread
_PATH_MAX = 4096
_NAME_MAX = 255
_BAD_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_C1 = re.compile("[\x80-\x9f]")


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
    """What :func:`unpack` created (duplicates that replaced earlier members included)."""

    compression: str  # "gzip" | "bzip2" | "xz" | "zstd" | "none"
    files: int
    directories: int
    symlinks: int
    hardlinks: int
    bytes: int  # unpacked bytes of regular files


def _umask() -> int:
    """The process umask, read without changing it (Linux); pessimistic if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777


def _fail(member: bytes, reason: str) -> UnpackError:
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
            raise _fail(member, f"{what} {problem}")
    if raw[:1] == b"/":
        raise _fail(member, f"absolute {what}" if what == "path" else f"{what} is absolute")
    parts = raw.split(b"/")
    if b".." in parts:
        raise _fail(member, f"{what} escapes the CID directory")
    if b"" in parts or b"." in parts:
        parts = [p for p in parts if p and p != b"."]
        raw = b"/".join(parts)
    if len(raw) > _NAME_MAX:
        if len(raw) + root_len >= _PATH_MAX:
            raise _fail(member, f"{what} too long ({len(raw)} bytes)")
        if max(map(len, parts)) > _NAME_MAX:
            raise _fail(member, f"{what} has a component longer than {_NAME_MAX} bytes")
    return raw


def check_symlink(rel: bytes, member: bytes, target: bytes) -> bool:
    """Check the target of a symlink at the cleaned path *rel*; UnpackError if it is bad.

    Returns True when the target has ``..`` after a normal component, so that it must be
    resolved again once every member exists (symlinks through symlinks).
    """
    problem = "is empty" if not target else _char_problem(target)
    if problem:
        raise _fail(member, f"symlink target {problem}")
    if target[:1] == b"/":
        raise _fail(member, f"absolute symlink target {show(target)}")
    if len(target) >= _PATH_MAX:
        raise _fail(member, "symlink target too long")
    depth = rel.count(b"/")  # components of the link's directory
    recheck = normal = False
    for comp in target.split(b"/"):
        if comp == b"..":
            depth -= 1
            recheck = recheck or normal
            if depth < 0:
                raise _fail(member, f"symlink target {show(target)} escapes the CID directory")
        elif comp and comp != b".":
            depth += 1
            normal = True
    return recheck


class _Writer:
    """A thread that writes large file bodies while the main thread goes on parsing.

    Items are handled in order: ``write`` queues data for *fd*, ``finish`` sets the mtime
    (unless None) and closes *fd*. The first error is re-raised in the main thread; after it
    data is dropped but every descriptor is still closed.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[int, memoryview | None, int | None] | None]
        self._queue = queue.Queue(16)
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="unpack-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, data, mtime = item
            try:
                if data is not None:
                    if self._error is None:
                        done = os.write(fd, data)
                        while done < len(data):
                            done += os.write(fd, data[done:])
                else:
                    try:
                        if mtime is not None and self._error is None:
                            os.utime(fd, ns=(mtime, mtime))
                    finally:
                        os.close(fd)
            except Exception as exc:  # re-raised in the main thread
                self._error = self._error or exc

    def write(self, fd: int, data: memoryview) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put((fd, data, None))
        return len(data)

    def finish(self, fd: int, mtime: int | None) -> None:
        self._queue.put((fd, None, mtime))

    def close(self, report: bool = True) -> None:
        """Wait until everything queued is written; raise the first write error if *report*."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if report and self._error is not None:
            raise self._error


class _Extractor:
    """Creates members below *root* and keeps the bookkeeping that makes that safe."""

    def __init__(self, root: bytes, limits: UnpackLimits, writer: _Writer) -> None:
        self.root = root  # ends with b"/"
        self.writer = writer
        self.max_members = limits.max_members
        self.max_bytes = limits.max_bytes
        self.fix_modes = bool(_umask() & 0o755)
        self.kinds: dict[bytes, str] = {b"": DIR}
        self.dirs: list[bytes] = []
        self.dir_meta: dict[bytes, tuple[int, int]] = {}
        self.recheck: list[tuple[bytes, bytes]] = []
        self.entries = self.files = self.symlinks = self.hardlinks = self.nbytes = 0

    def clean(self, raw: bytes, member: bytes, what: str = "path") -> bytes:
        """Return the normalised relative path of *raw*, or raise."""
        return clean_path(raw, member, len(self.root), what)

    def _count(self, member: bytes) -> None:
        self.entries += 1
        if self.entries > self.max_members:
            raise _fail(member, f"too many members (more than {self.max_members})")

    def _place(self, rel: bytes, member: bytes, kind: str) -> None:
        """Make room for a new *kind* entry at *rel*: create parents or remove the old entry."""
        kinds = self.kinds
        old = kinds.get(rel)
        if old is not None:
            if DIR in (old, kind):
                raise _fail(member, f"would replace a {old} with a {kind}")
            os.unlink(self.root + rel)
            return
        self._count(member)
        parent = rel.rpartition(b"/")[0]
        if kinds.get(parent) == DIR:
            return
        missing = []
        while parent:
            k = kinds.get(parent)
            if k == DIR:
                break
            if k is not None:
                raise _fail(member, f"path goes through a {k} {show(parent)}")
            missing.append(parent)
            parent = parent.rpartition(b"/")[0]
        for p in reversed(missing):
            self._count(member)
            os.mkdir(self.root + p, 0o755)
            kinds[p] = DIR
            self.dirs.append(p)

    def file(self, m: Member, reader: TarReader) -> None:
        raw = m.name
        rel = self.clean(raw, raw)
        if not rel:
            raise _fail(raw, "a file cannot replace the CID directory")
        size = m.size
        if self.nbytes + size > self.max_bytes:
            raise _fail(raw, f"unpacked size exceeds the limit of {self.max_bytes} bytes")
        self.nbytes += size
        self._place(rel, raw, REG)
        mode = 0o755 if m.mode & 0o111 else 0o644
        fd = os.open(self.root + rel, _FLAGS, mode)
        if self.fix_modes:
            try:
                os.fchmod(fd, mode)
            except OSError:
                os.close(fd)
                raise
        if size >= _BIG:  # the body is written by the writer thread, which closes fd
            done = False
            try:
                reader.copy_to(fd, self.writer.write)
                done = True
            finally:
                self.writer.finish(fd, m.mtime_ns if done else None)
        else:
            try:
                if size:
                    reader.copy_to(fd)
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)
        self.kinds[rel] = REG
        self.files += 1

    def directory(self, m: Member, reader: TarReader) -> None:
        rel = self.clean(m.name, m.name)
        if self.kinds.get(rel) != DIR:
            self._place(rel, m.name, DIR)
            os.mkdir(self.root + rel, 0o755)
            self.kinds[rel] = DIR
            self.dirs.append(rel)
        self.dir_meta[rel] = (m.mode, m.mtime_ns)

    def symlink(self, m: Member, reader: TarReader) -> None:
        raw, target = m.name, m.linkname
        rel = self.clean(raw, raw)
        if not rel:
            raise _fail(raw, "a symlink cannot replace the CID directory")
        recheck = check_symlink(rel, raw, target)
        self._place(rel, raw, SYM)
        full = self.root + rel
        os.symlink(target, full)
        os.utime(full, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)
        self.kinds[rel] = SYM
        self.symlinks += 1
        if recheck:
            self.recheck.append((rel, raw))

    def hardlink(self, m: Member, reader: TarReader) -> None:
        raw = m.name
        rel = self.clean(raw, raw)
        if not m.linkname:
            raise _fail(raw, "hard link target is empty")
        target = self.clean(m.linkname, raw, "hard link target")
        if self.kinds.get(target) != REG:
            raise _fail(raw, f"hard link target {show(m.linkname)} is not a file extracted earlier")
        if target == rel:
            raise _fail(raw, "hard link to itself")
        self._place(rel, raw, LNK)
        os.link(self.root + target, self.root + rel, follow_symlinks=False)
        self.kinds[rel] = REG
        self.hardlinks += 1

    def finish(self) -> None:
        """Re-check symlinks with ``..`` inside, then apply directory modes and mtimes."""
        base = os.path.realpath(self.root)
        for rel, raw in self.recheck:
            if self.kinds.get(rel) == SYM:
                real = os.path.realpath(self.root + rel)
                if real != base and not real.startswith(base + b"/"):
                    raise _fail(raw, "symlink resolves outside the CID directory")
        for rel in [*self.dirs, b""]:
            mode, mtime = self.dir_meta.get(rel, (0o755, None))
            final = (mode & 0o777) | 0o755
            path = self.root + rel
            if final != 0o755 or self.fix_modes or not rel:
                os.chmod(path, final)
            if mtime is not None:
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def _make_dest(dest: Path) -> None:
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(dest).st_mode) or os.listdir(dest):
            raise FileExistsError(f"{dest} exists and is not an empty directory") from None


def unpack(source: Path, dest: Path, limits: UnpackLimits = UnpackLimits()) -> UnpackStats:
    """Extract the tarball *source* into *dest* (created; its parent must exist).

    Raises UnpackError if the archive is bad or hostile; the caller removes *dest* after any
    exception. Nothing is ever written outside *dest*.
    """
    with open(source, "rb") as f:
        _make_dest(Path(dest))
        compression = detect_compression(os.pread(f.fileno(), 4096, 0))
        writer = _Writer()
        try:
            ex = _Extractor(os.fsencode(dest) + b"/", limits, writer)
            handlers = {REG: ex.file, DIR: ex.directory, SYM: ex.symlink, LNK: ex.hardlink}
            with open_chunks(f, compression) as chunks:
                reader = TarReader(chunks, 3 * limits.max_members + 16, limits.max_bytes)
                for member in reader:
                    handlers[member.kind](member, reader)
        except BaseException:
            writer.close(report=False)
            raise
        writer.close()
    ex.finish()
    return UnpackStats(
        compression=compression,
        files=ex.files,
        directories=len(ex.dirs),
        symlinks=ex.symlinks,
        hardlinks=ex.hardlinks,
        bytes=ex.nbytes,
    )
