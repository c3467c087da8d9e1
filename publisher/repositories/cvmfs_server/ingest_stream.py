"""The tar stream handed to ``cvmfs_server ingest`` in the optional ingest mode.

``cvmfs_server ingest -t - -b <prefix>/<cid> -c <repo>`` reads a tar stream on stdin and
writes catalog entries straight from it, without unpacking into the overlay. What it gets
from us is the user's tarball, decompressed here (the same decoders as the unpacker), with:

* every header checked (checksum, member types, sizes) and every name judged by the
  unpacker's rules: no absolute paths, no ``..``, valid UTF-8 without control characters,
  symlink targets that stay inside the CID, hard links to names inside it; member and
  byte limits enforced. A violation raises :class:`UnpackError` before ingest sees the
  member, so ingest's own parser never gets to interpret a hostile stream differently;
* links and directories with a non-zero size rejected (parsers disagree on them);
* the user's own top-level ``.publisher`` / ``.cvmfscatalog`` dropped, and our publisher
  record appended as the last member, so the CID appears complete in one ingest;
* the end-of-archive marker rewritten (anything after the user's marker is ignored).
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from publisher.repositories.tree import CATALOG_MARKER, PUBLISHER_RECORD
from publisher.tarball.decompress import (
    ChunkSource,
    UnpackError,
    detect_compression,
    open_chunks,
    tar_checksum_ok,
)
from publisher.tarball.stream import BLOCK, MAX_META, parse_pax, show
from publisher.tarball.unpack import UnpackLimits, UnpackStats

_ZERO = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")
_OTHER_TYPES = (b"5", b"1", b"2")  # directory, hard link, symlink
_META_TYPES = (b"x", b"g", b"L", b"K")
_OURS = (PUBLISHER_RECORD, CATALOG_MARKER)


class _Exact:
    """Exact-size reads over a ChunkSource without copying whole chunks around."""

    def __init__(self, source: ChunkSource) -> None:
        self.source = source
        self.buf = b""
        self.pos = 0

    def upto(self, n: int) -> bytes:
        """At most ``n`` bytes (fewer only at a chunk boundary); b'' at the end."""
        if self.pos >= len(self.buf):
            self.buf, self.pos = self.source.read(), 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer at the end of the stream."""
        parts = []
        while n > 0:
            piece = self.upto(n)
            if not piece:
                break
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _size(hdr: bytes, where: int) -> int:
    field = hdr[124:136]
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big") if field[0] == 0x80 else -1
    else:
        digits = field.split(b"\0", 1)[0].strip() or b"0"
        value = int(digits, 8) if all(48 <= c <= 55 for c in digits) else -1
    if value < 0:
        raise UnpackError(f"corrupt archive: bad size field at offset {where}")
    return value


def _clean(raw: bytes, what: str) -> list[str]:
    """The components of a member name or hard-link target, judged like the unpacker does."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnpackError(f"member {show(raw)}: {what} is not valid UTF-8") from None
    if any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text):
        raise UnpackError(f"member {show(raw)}: control characters in the {what}")
    if text.startswith("/"):
        raise UnpackError(f"member {show(raw)}: absolute {what}")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnpackError(f"member {show(raw)}: '..' in the {what}")
    if any(len(p.encode()) > 255 for p in parts) or len(raw) > 4096:
        raise UnpackError(f"member {show(raw)}: {what} too long")
    return parts


def _check_symlink(name: list[str], target: bytes, raw_name: bytes) -> None:
    try:
        text = target.decode("utf-8")
    except UnicodeDecodeError:
        raise UnpackError(f"member {show(raw_name)}: symlink target is not valid UTF-8") from None
    if not text or text.startswith("/") or any(ord(c) < 32 for c in text):
        raise UnpackError(f"member {show(raw_name)}: symlink target {show(target)} not allowed")
    where = name[:-1]
    for part in text.split("/"):
        if part == "..":
            if not where:
                raise UnpackError(f"member {show(raw_name)}: symlink target {show(target)} "
                                  "points outside the tarball")
            where = where[:-1]
        elif part not in ("", "."):
            where = [*where, part]


def _record(submitter: str) -> bytes:
    info = tarfile.TarInfo(PUBLISHER_RECORD)
    data = f"{submitter}\n".encode()
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + \
        data + bytes(_padded(len(data)) - len(data))


class IngestStream:
    """:meth:`chunks` yields the stream; afterwards :meth:`stats` describes what was sent."""

    def __init__(self, payload: Path, submitter: str, limits: UnpackLimits) -> None:
        self.payload = payload
        self.submitter = submitter
        self.limits = limits
        self.compression = "none"
        self.counts = {b"0": 0, b"5": 0, b"2": 0, b"1": 0}  # files, dirs, symlinks, hard links
        self.bytes = 0

    def chunks(self) -> Generator[bytes, None, None]:
        """The stream (close the generator when not consuming it to the end)."""
        with open(self.payload, "rb") as f:
            self.compression = detect_compression(os.pread(f.fileno(), 4096, 0))
            with open_chunks(f, self.compression) as chunks:
                yield from self._members(_Exact(chunks))
        yield _record(self.submitter)
        yield bytes(2 * BLOCK)

    def stats(self) -> UnpackStats:
        """What was streamed, in the unpacker's terms."""
        c = self.counts
        return UnpackStats(self.compression, c[b"0"], c[b"5"], c[b"2"], c[b"1"], self.bytes)

    def _members(self, src: _Exact) -> Iterator[bytes]:
        """Pass the checked members through, without the end-of-archive marker."""
        limits = self.limits
        members = 0
        pending: list[bytes] = []  # meta headers, held until their member is judged
        pax: dict[bytes, bytes] = {}
        gpax: dict[bytes, bytes] = {}
        longname = longlink = None
        offset = 0
        while True:
            hdr = src.exact(BLOCK)
            if len(hdr) < BLOCK:
                raise UnpackError("truncated archive (no end-of-archive marker)")
            if hdr == _ZERO:
                return
            if not tar_checksum_ok(hdr):
                raise UnpackError(f"corrupt archive: bad header checksum at offset {offset}")
            flag, size = hdr[156:157], _size(hdr, offset)
            offset += BLOCK
            if flag in _META_TYPES:
                if size > MAX_META:
                    raise UnpackError(f"corrupt archive: metadata header too large at {offset}")
                raw = src.exact(_padded(size))
                if len(raw) < _padded(size):
                    raise UnpackError("truncated archive")
                offset += len(raw)
                data = raw[:size]
                if flag in b"xg":
                    (pax if flag == b"x" else gpax).update(parse_pax(data))
                elif flag == b"L":
                    longname = data.rstrip(b"\0")
                else:
                    longlink = data.rstrip(b"\0")
                pending.append(hdr + raw)
                continue
            ext = {**gpax, **pax}
            pax = {}
            name = ext.get(b"path") or longname or hdr[0:100].split(b"\0", 1)[0]
            if not (ext.get(b"path") or longname) and hdr[257:263] == b"ustar\x00" and hdr[345]:
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            link = ext.get(b"linkpath") or longlink or hdr[157:257].split(b"\0", 1)[0]
            longname = longlink = None
            if b"size" in ext:
                try:
                    size = int(ext[b"size"])
                except ValueError:
                    raise UnpackError(f"member {show(name)}: malformed pax size") from None
            if flag not in _FILE_TYPES + _OTHER_TYPES or any(
                    k.startswith(b"GNU.sparse") for k in ext):
                raise UnpackError(f"member {show(name)}: member type {show(flag)} not allowed")
            if flag in _OTHER_TYPES and size:
                raise UnpackError(f"member {show(name)}: a link or directory with data")
            parts = _clean(name, "name")
            if flag == b"1":
                _clean(link, "hard link target")
            elif flag == b"2":
                _check_symlink(parts, link, name)
            members += 1
            self.bytes += size
            if members > limits.max_members:
                raise UnpackError(f"too many members (limit {limits.max_members})")
            if self.bytes > limits.max_bytes:
                raise UnpackError(f"unpacked size exceeds the limit of {limits.max_bytes} bytes")
            drop = len(parts) == 1 and parts[0] in _OURS
            if not drop:
                self.counts[b"0" if flag in _FILE_TYPES else flag] += 1
                yield b"".join(pending) + hdr
            pending = []
            remaining = _padded(size)
            offset += remaining
            while remaining:
                piece = src.upto(remaining)
                if not piece:
                    raise UnpackError("truncated archive")
                remaining -= len(piece)
                if not drop:
                    yield piece
