"""Streaming, safe and fast extraction of a user's tarball into a fresh CID directory.

``unpack(source, dest)`` detects the compression from the content (gzip, bzip2, xz, zstd or
none), decompresses on another core (see :mod:`publisher.tarball.decompress`), parses the tar stream
with a lean parser (:mod:`publisher.tarball.stream`) and writes every member strictly below *dest*.

The rules about members are :mod:`publisher.tarball.rules` (the one copy, shared with every
backend); this module does what they decide on disk, and never writes through a symlink: files
are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and the rules track what was created (*dest*
must be new or empty, so they mirror the disk).

Directory modes are applied at the end, so read-only directories in the archive do not block
extraction; setuid/setgid/sticky bits are dropped, owners are not restored. Member mtimes are
restored on files, symlinks and (at the end) directories.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from pathlib import Path

from publisher.tarball.decompress import UnpackError, detect_compression, open_chunks
from publisher.tarball.rules import MemberRules, Placement, UnpackLimits, UnpackStats, file_mode
from publisher.tarball.stream import DIR, LNK, REG, SYM, Member, TarReader

__all__ = ["UnpackError", "UnpackLimits", "UnpackStats", "unpack"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_BIG = 256 * 1024  # file bodies at least this large are written by the writer thread
DEFAULT_LIMITS = UnpackLimits()


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
    """Does on disk below *root* what the member rules decide."""

    def __init__(self, root: bytes, limits: UnpackLimits, writer: _Writer) -> None:
        self.root = root  # ends with b"/"
        self.writer = writer
        self.rules = MemberRules(len(root), limits)
        self.fix_modes = bool(_umask() & 0o755)
        self.dirs: list[bytes] = []

    def _prepare(self, placed: Placement) -> bytes:
        """Remove the entry a member replaces, create the parents it implies; its full path."""
        full = self.root + placed.rel
        if placed.replaces:
            os.unlink(full)
        for parent in placed.parents:
            os.mkdir(self.root + parent, 0o755)
            self.dirs.append(parent)
        return full

    def file(self, m: Member, reader: TarReader) -> None:
        placed = self.rules.file(m)
        if placed is None:
            return  # a reserved name: its data is skipped by the reader
        full = self._prepare(placed)
        mode = file_mode(m.mode)
        fd = os.open(full, _FLAGS, mode)
        if self.fix_modes:
            try:
                os.fchmod(fd, mode)
            except OSError:
                os.close(fd)
                raise
        if m.size >= _BIG:  # the body is written by the writer thread, which closes fd
            done = False
            try:
                reader.copy_to(fd, self.writer.write)
                done = True
            finally:
                self.writer.finish(fd, m.mtime_ns if done else None)
        else:
            try:
                if m.size:
                    reader.copy_to(fd)
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)

    def directory(self, m: Member, reader: TarReader) -> None:
        placed = self.rules.directory(m)
        if placed is not None:
            os.mkdir(self._prepare(placed), 0o755)
            self.dirs.append(placed.rel)

    def symlink(self, m: Member, reader: TarReader) -> None:
        placed = self.rules.symlink(m)
        if placed is None:
            return
        full = self._prepare(placed)
        os.symlink(placed.target, full)
        os.utime(full, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)

    def hardlink(self, m: Member, reader: TarReader) -> None:
        placed = self.rules.hardlink(m)
        if placed is None:
            return
        full = self._prepare(placed)
        os.link(self.root + placed.target, full, follow_symlinks=False)

    def finish(self) -> None:
        """Apply directory modes and mtimes."""
        described = {rel: (mode, mtime) for rel, mode, mtime in self.rules.directory_modes()}
        for rel in [*self.dirs, b""]:
            final, mtime = described.get(rel, (0o755, None))
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


def unpack(source: Path, dest: Path, limits: UnpackLimits = DEFAULT_LIMITS) -> UnpackStats:
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
    return ex.rules.stats(compression)
