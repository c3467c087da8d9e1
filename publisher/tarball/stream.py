"""A lean streaming tar parser (ustar, GNU long names, pax) over a ChunkSource.

It never holds more than one decompressed chunk plus one header, and copies member data straight
from the chunk buffers to file descriptors. Only the structure is parsed here; names are returned
as raw bytes and judged by the caller (:mod:`publisher.tarball.unpack`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from publisher.tarball.decompress import OCTAL, ChunkSource, UnpackError, tar_checksum_ok

BLOCK = 512
_ZERO = bytes(BLOCK)
MAX_META = 1 << 20  # largest pax header / GNU long name accepted
MAX_TRAILING = 64 << 20  # data accepted after the end-of-archive marker
# Member kinds reported by TarReader.
REG, DIR, SYM, LNK = "file", "directory", "symlink", "hardlink"
_KINDS = {b"0": REG, b"\0": REG, b"7": REG, b"5": DIR, b"2": SYM, b"1": LNK}
_SPECIAL = {b"3": "character device", b"4": "block device", b"6": "fifo", b"S": "sparse file"}
_META = (b"x", b"g", b"X", b"L", b"K")  # X: old Solaris pax header
_NS = 1_000_000_000
_TLIM = 1 << 62  # clamp mtimes (ns) to what utime accepts


@dataclass(slots=True)
class Member:
    """One archive member; *name*/*linkname* are raw bytes as stored in the archive."""

    name: bytes
    kind: str
    mode: int
    mtime_ns: int
    size: int
    linkname: bytes


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, 0xff prefix = negative
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else n
    digits = field.split(b"\0", 1)[0].strip()
    if digits.strip(OCTAL):
        raise ValueError
    return int(digits, 8) if digits else 0


def _pax_time(value: bytes) -> int:
    text = value.decode("ascii")
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError
    ns = int(whole) * _NS + int((frac + "000000000")[:9])
    return -ns if neg else ns


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Parse pax extended header records ``"<len> <key>=<value>\\n"``."""
    out: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:  # NUL padding ends the records
            break
        sp = data.find(b" ", pos, pos + 21)
        length = int(data[pos:sp]) if sp > pos and data[pos:sp].isdigit() else 0
        rec = data[pos : pos + length]
        if length <= sp - pos + 1 or len(rec) < length or not rec.endswith(b"\n"):
            raise UnpackError("malformed pax extended header")
        key, eq, value = rec[sp - pos + 1 : -1].partition(b"=")
        if not eq:
            raise UnpackError("malformed pax extended header")
        out[key] = value
        pos += length
    return out


class TarReader:
    """Iterate over the members of a tar stream.

    The data of the last regular file yielded can be written out with :meth:`copy_to` or read
    with :meth:`read_data`; data not consumed is skipped when iteration continues.
    *max_headers* and *max_meta* (bytes of pax headers and long names) bound the work a
    hostile archive can cause.
    """

    def __init__(self, source: ChunkSource, max_headers: int, max_meta: int) -> None:
        self._src = source
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._max_headers = max_headers
        self._max_meta = max_meta
        self.offset = 0  # stream offset of the last header read (for messages)
        self._consumed = 0  # stream offset of the start of self._buf
        self._pending = 0  # data bytes of the current member not consumed yet

    # -- low-level buffer ---------------------------------------------------------------
    def _fill(self) -> bool:
        data = self._src.read()
        if not data:
            return False
        self._consumed += len(self._buf)
        self._buf = data
        self._mv = memoryview(data)
        self._pos = 0
        return True

    def _read(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        got = len(parts[0])
        self._pos = len(self._buf)
        while got < n and self._fill():
            take = min(n - got, len(self._buf))
            parts.append(self._buf[:take])
            self._pos = take
            got += take
        return b"".join(parts)

    def _truncated(self) -> UnpackError:
        return UnpackError("truncated archive (unexpected end of data)")

    def copy_to(self, fd: int, write: Callable[[int, memoryview], int] = os.write) -> None:
        """Write the current member's data to *fd* with *write*, then skip the padding.

        *write* receives read-only views of the decompressed chunks (never reused).
        """
        size, self._pending = self._pending, 0
        pad = -size % BLOCK
        while size:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise self._truncated()
                avail = len(self._buf)
            n = min(avail, size)
            pos = self._pos
            done = write(fd, self._mv[pos : pos + n])
            while done < n:
                done += write(fd, self._mv[pos + done : pos + n])
            self._pos = pos + n
            size -= n
        if pad:
            self._skip(pad)

    def read_data(self, size: int) -> bytes:
        """The next *size* bytes of the current member's data, as bytes.

        Read the data whole, or in pieces whose sizes are multiples of 512 followed by the
        remainder; the block padding is skipped after the last piece. Data not read is skipped
        when iteration continues, as with :meth:`copy_to`.
        """
        if size > self._pending or (size < self._pending and size % BLOCK):
            raise ValueError("read_data: read 512-byte multiples, then the remainder")
        data = self._read(size)
        if len(data) < size:
            raise self._truncated()
        self._pending -= size
        if not self._pending:
            self._skip(-size % BLOCK)
        return data

    def _skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise self._truncated()
                avail = len(self._buf)
            step = min(avail, n)
            self._pos += step
            n -= step

    def _meta_data(self, size: int, what: str) -> bytes:
        if size > MAX_META:
            raise UnpackError(f"{what} of {size} bytes is too large")
        self._max_meta -= size
        if self._max_meta < 0:
            raise UnpackError("too much metadata (pax headers / long names)")
        data = self._read(size)
        if len(data) < size:
            raise self._truncated()
        self._skip(-size % BLOCK)
        return data

    def _drain(self) -> None:
        left = MAX_TRAILING - (len(self._buf) - self._pos)
        while self._fill():
            left -= len(self._buf)
            if left < 0:
                raise UnpackError("too much data after the end-of-archive marker")
        self._pos = len(self._buf)

    # -- headers --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Member]:
        gpax: dict[bytes, bytes] = {}
        pax: dict[bytes, bytes] = {}
        longname = longlink = None
        headers = 0
        while True:
            if self._pending:
                self._skip(self._pending + (-self._pending % BLOCK))
                self._pending = 0
            self.offset = self._consumed + self._pos
            hdr = self._read(BLOCK)
            if len(hdr) < BLOCK:
                if not hdr and headers == 0:
                    raise UnpackError("not a tar archive (no data)")
                raise UnpackError("truncated archive (no end-of-archive marker)")
            if hdr == _ZERO:
                self._drain()
                return
            if not tar_checksum_ok(hdr):
                if headers == 0:
                    raise UnpackError("not a tar archive (bad header checksum)")
                raise UnpackError(f"corrupt archive: bad header checksum at offset {self.offset}")
            headers += 1
            if headers > self._max_headers:
                raise UnpackError(f"too many members (more than {self._max_headers} headers)")
            flag = hdr[156:157]
            try:
                size = _number(hdr[124:136])
                mode = _number(hdr[100:108])
                mtime_ns = _number(hdr[136:148]) * _NS
            except ValueError:
                raise UnpackError(
                    f"corrupt archive: bad numeric field at offset {self.offset}"
                ) from None
            if size < 0:
                raise UnpackError(f"corrupt archive: negative size at offset {self.offset}")
            if flag in _META:
                data = self._meta_data(size, "pax header" if flag in b"xgX" else "GNU long name")
                if flag in b"xX":
                    pax.update(parse_pax(data))
                elif flag == b"g":
                    gpax.update(parse_pax(data))
                elif flag == b"L":
                    longname = data.rstrip(b"\0")
                else:
                    longlink = data.rstrip(b"\0")
                continue
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:263] == b"ustar\x00":
                prefix = hdr[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            linkname = hdr[157:257].split(b"\0", 1)[0]
            if longname is not None:
                name, longname = longname, None
            if longlink is not None:
                linkname, longlink = longlink, None
            if gpax or pax:
                ext = {**gpax, **pax} if gpax else pax
                pax = {}
                if any(k.startswith(b"GNU.sparse.") for k in ext):
                    raise UnpackError(f"member {show(name)}: sparse files are not supported")
                try:
                    name = ext.get(b"path") or name
                    linkname = ext.get(b"linkpath") or linkname
                    if ext.get(b"size"):
                        size = int(ext[b"size"].decode("ascii"))
                        if size < 0:
                            raise ValueError
                    if ext.get(b"mtime"):
                        mtime_ns = _pax_time(ext[b"mtime"])
                except (ValueError, UnicodeDecodeError):
                    raise UnpackError(f"member {show(name)}: malformed pax record") from None
            kind = _KINDS.get(flag)
            if kind is None:
                if flag == b"V":  # GNU volume label: no file
                    self._pending = size
                    continue
                what = _SPECIAL.get(flag) or f"unsupported member type {show(flag)}"
                raise UnpackError(f"member {show(name)}: {what} not allowed")
            if kind == REG:
                if name.endswith(b"/"):  # old archives store directories this way
                    if size:
                        raise UnpackError(f"member {show(name)}: file name ends with '/'")
                    kind = DIR
            else:
                size = 0  # like GNU tar and tarfile: no data follows dirs and links
            mtime_ns = min(max(mtime_ns, -_TLIM), _TLIM)
            self._pending = size
            yield Member(name, kind, mode, mtime_ns, size, linkname)


def show(raw: bytes, limit: int = 160) -> str:
    """Quote a raw archive name for a one-line message (printable, escaped, shortened)."""
    out = []
    for c in raw.decode("utf-8", "surrogateescape"):
        if 0xDC80 <= ord(c) <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c in "\\'":
            out.append("\\" + c)
        else:
            out.append(c if c.isprintable() else repr(c)[1:-1])
    text = "".join(out)
    if len(text) > limit:
        text = text[: limit // 2] + "..." + text[-limit // 2 :]
    return "'" + text + "'"
