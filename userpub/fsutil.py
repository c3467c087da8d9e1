"""Small filesystem primitives the spool, the repositories and the janitor build on."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import shutil
import socket
import stat
import time
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_counter = itertools.count()  # process-wide, for unique_id


def unique_id() -> str:
    """A collision-free name for temporary entries: time, pid, counter and host."""
    return f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname()}"


def rename_noreplace(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (file or dir).

    Uses renameat2(RENAME_NOREPLACE); where the kernel or filesystem lacks it, falls back to
    link+unlink for files and to rename(2) (which refuses non-empty directories) for dirs.
    """
    if _renameat2 is not None:
        res = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                         _RENAME_NOREPLACE)
        if res == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if src.is_dir() and not src.is_symlink():
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that renames into it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes = b"", mode: int = 0o644) -> None:
    """Create ``path`` with ``data``; FileExistsError if anything (a symlink too) is there.

    Never follows a symlink: what a user's tarball left in a directory cannot redirect it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync one file by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (one syncfs(2); far cheaper than fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def make_writable_tree(path: Path) -> None:
    """Give the owner rwx on every directory under ``path`` (tarballs may hold read-only dirs)."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o700) != 0o700:
                    os.chmod(full, st.st_mode | 0o700)


def remove_tree(path: Path) -> None:
    """Remove a file or a whole tree, read-only directories included; missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if (st.st_mode & 0o700) != 0o700:
        os.chmod(path, st.st_mode | 0o700)

    def onexc(func: object, failed: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        parent = os.path.dirname(failed)
        os.chmod(parent, os.lstat(parent).st_mode | 0o700)
        make_writable_tree(Path(parent))
        if os.path.isdir(failed) and not os.path.islink(failed):
            shutil.rmtree(failed, ignore_errors=False)
        else:
            os.unlink(failed)

    make_writable_tree(path)
    shutil.rmtree(path, onerror=lambda f, p, e: onexc(f, p, e[1]))


def tree_size(path: Path) -> int:
    """Bytes used by the regular files under ``path`` (apparent size)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total
