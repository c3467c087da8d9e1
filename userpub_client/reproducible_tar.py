"""Tarballs on the user's side: reproducible creation, recognition, and the CID.

:func:`make_tarball` writes the same bytes for the same tree, whatever the owners, times and
umask, so unchanged code keeps its CID and is not uploaded again: members in name order
(each directory's entries sorted), uid/gid 0 without user or group names, one fixed mtime,
modes normalised to 0755 (directories and executables) or 0644, hard links stored as
plain files, and a gzip header without timestamp or file name (``gzip -n``). The output
is byte-identical on one machine; another zlib version may compress differently.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
# Tarball signatures: (offset, magic); tar's "ustar" sits at offset 257.
_MAGIC = ((0, b"\x1f\x8b"), (0, b"BZh"), (0, b"\xfd7zXZ\x00"), (0, b"\x28\xb5\x2f\xfd"),
          (257, b"ustar"))


class TarballError(Exception):
    """A tree that cannot be archived, or a file that is not a tarball; ``str()`` says why."""


@dataclass(frozen=True)
class TarSummary:
    """What :func:`make_tarball` wrote."""

    path: Path
    files: int
    directories: int
    symlinks: int
    size: int


def _walk(root: Path, skip: frozenset[tuple[int, int]], excludes: Sequence[str],
          relative: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(relative posix name, entry) depth-first, each directory's entries sorted by name."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        raise TarballError(f"cannot list {root}: {err.strerror}") from None
    for entry in entries:
        name = f"{relative}{entry.name}"
        st = entry.stat(follow_symlinks=False)
        if (st.st_dev, st.st_ino) in skip or any(
                fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(entry.name, p)
                for p in excludes):
            continue
        yield name, entry
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), skip, excludes, f"{name}/")


def _member(name: str, entry: os.DirEntry[str], mtime: int) -> tarfile.TarInfo:
    st = entry.stat(follow_symlinks=False)
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = mtime
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.mode = tarfile.SYMTYPE, 0o777
        info.linkname = os.readlink(entry.path)
    else:
        raise TarballError(f"{entry.path}: not a file, directory or symlink "
                           "(leave it out with --exclude)")
    return info


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def make_tarball(source: Path, output: Path, *, mtime: int = 0,
                 excludes: Sequence[str] = (), level: int = 6) -> TarSummary:
    """Write a reproducible ``.tar.gz`` of ``source``'s content to ``output`` (atomically).

    Member names are relative to ``source`` (no leading ``./``). ``excludes`` are shell
    patterns matched against the relative name and the base name; an excluded directory
    is not entered. ``output`` (and its temporary file) are left out when inside ``source``.
    """
    if not source.is_dir():
        raise TarballError(f"{source}: not a directory")
    output = output.absolute()
    temp = output.with_name(f".{output.name}.{os.getpid()}.part")
    counts = {tarfile.REGTYPE: 0, tarfile.DIRTYPE: 0, tarfile.SYMTYPE: 0}
    try:
        with temp.open("wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                              compresslevel=level) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            skip = {(st.st_dev, st.st_ino) for st in (os.fstat(raw.fileno()), _stat(output))
                    if st is not None}
            for name, entry in _walk(source, frozenset(skip), excludes):
                info = _member(name, entry, mtime)
                counts[info.type] += 1
                if info.type == tarfile.REGTYPE:
                    try:
                        with open(entry.path, "rb") as data:
                            tar.addfile(info, data)
                    except OSError as err:
                        raise TarballError(f"cannot read {entry.path}: {err}") from None
                else:
                    tar.addfile(info)
        os.replace(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return TarSummary(output, counts[tarfile.REGTYPE], counts[tarfile.DIRTYPE],
                      counts[tarfile.SYMTYPE], output.stat().st_size)


def check_tarball(path: Path) -> int:
    """The size of ``path`` if it looks like a (compressed) tarball; TarballError otherwise."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
            size = f.seek(0, 2)
    except IsADirectoryError:
        raise TarballError(f"{path} is a directory (make a tarball with `userpub tar`)") from None
    except OSError as err:
        raise TarballError(f"cannot read {path}: {err.strerror}") from None
    if not any(head[o:o + len(m)] == m for o, m in _MAGIC):
        raise TarballError(f"{path} is not a tar file (plain, gzip, bzip2, xz or zstd)")
    return size


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise TarballError(f"cannot read {path}: {err.strerror}") from None
    return digest.hexdigest()


def tarball_cid(path: Path, group: str | None) -> str:
    """jobsub_lite's CID: ``<group>/<sha256 of the tarball>`` (just the hash without a group)."""
    digest = file_sha256(path)
    return f"{group.strip('/')}/{digest}" if group else digest
