"""The tar stream handed to ``cvmfs_server ingest`` in the optional ingest mode.

``cvmfs_server ingest -t - -b <prefix>/<cid> -c <repo>`` reads a tar stream on stdin and
writes catalog entries straight from it, without unpacking into the overlay. What it gets
from us is not the user's archive but a canonical one rewritten from it:

* the user's tarball is decompressed and parsed by our own reader
  (:mod:`publisher.tarball.stream`), and every member is judged by the rules every backend
  shares (:class:`publisher.tarball.rules.MemberRules`: names, symlink targets, hard links,
  nothing through a symlink, limits) before it is sent; a violation raises
  :class:`UnpackError` before ingest sees the member;
* each accepted member is written anew as a plain pax member (cleaned name, the modes the
  unpacker would give, mtime, data): ingest's parser never interprets a hostile header, an
  odd encoding or a size field differently from us, because it never sees one;
* the user's own top-level ``.publisher`` / ``.cvmfscatalog`` are dropped (reserved names of the
  rules), and our publisher record is appended as the last member, so the CID appears complete
  in one ingest.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from publisher.repositories.tree import PUBLISHER_RECORD
from publisher.tarball.decompress import detect_compression, open_chunks
from publisher.tarball.rules import MemberRules, UnpackLimits, UnpackStats, dir_mode, file_mode
from publisher.tarball.stream import BLOCK, DIR, LNK, REG, SYM, Member, TarReader

__all__ = ["IngestStream"]

_PIECE = 1 << 20  # bytes of file data read at a time (a multiple of 512)
_TYPES = {REG: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYM: tarfile.SYMTYPE, LNK: tarfile.LNKTYPE}


def _header(name: bytes, kind: str, mode: int, mtime_ns: int, size: int = 0,
            linkname: bytes = b"") -> bytes:
    info = tarfile.TarInfo(os.fsdecode(name))
    info.type = _TYPES[kind]
    info.mode, info.size, info.mtime = mode, size, mtime_ns / 1e9
    info.linkname = os.fsdecode(linkname)
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def _record(submitter: str) -> bytes:
    data = f"{submitter}\n".encode()
    return (_header(PUBLISHER_RECORD.encode(), REG, 0o644, time.time_ns(), len(data))
            + data + _padding(len(data)))


class IngestStream:
    """:meth:`chunks` yields the stream; afterwards :meth:`stats` describes what was sent.

    *visible_root* is where the CID directory appears to readers (``/cvmfs/<repo>/sw/<cid>``),
    for the PATH_MAX check.
    """

    def __init__(self, payload: Path, submitter: str, limits: UnpackLimits,
                 visible_root: bytes = b"") -> None:
        self.payload = payload
        self.submitter = submitter
        self.limits = limits
        self.rules = MemberRules(len(visible_root.rstrip(b"/") + b"/"), limits)
        self.compression = "none"

    def chunks(self) -> Generator[bytes, None, None]:
        """The stream (close the generator when not consuming it to the end)."""
        with open(self.payload, "rb") as f:
            self.compression = detect_compression(os.pread(f.fileno(), 4096, 0))
            with open_chunks(f, self.compression) as source:
                reader = TarReader(source, 3 * self.limits.max_members + 16,
                                   self.limits.max_bytes)
                for member in reader:
                    yield from self._member(member, reader)
        yield _record(self.submitter)
        yield bytes(2 * BLOCK)

    def stats(self) -> UnpackStats:
        """What was streamed, in the unpacker's terms."""
        return self.rules.stats(self.compression)

    def _member(self, m: Member, reader: TarReader) -> Iterator[bytes]:
        """The canonical form of one judged member (nothing for a dropped one)."""
        rules = self.rules
        if m.kind == REG:
            placed = rules.file(m)
            if placed is None:
                return  # the data is skipped by the reader
            yield _header(placed.rel, REG, file_mode(m.mode), m.mtime_ns, m.size)
            left = m.size
            while left:
                piece = min(left, _PIECE)
                yield reader.read_data(piece)
                left -= piece
            yield _padding(m.size)
        elif m.kind == DIR:
            rules.directory(m)  # judged (an existing one is described again: its mode, mtime)
            rel = rules.clean(m.name, m.name)
            if rel and not rules.reserved(rel):
                yield _header(rel, DIR, dir_mode(m.mode), m.mtime_ns)
        elif m.kind == SYM:
            link = rules.symlink(m)
            if link is not None:
                yield _header(link.rel, SYM, 0o777, m.mtime_ns, linkname=link.target)
        elif m.kind == LNK:
            hard = rules.hardlink(m)
            if hard is not None:
                yield _header(hard.rel, LNK, 0o644, m.mtime_ns, linkname=hard.target)
