"""Content-defined chunking of large files by the CVMFS rules (xor32 rolling checksum).

CVMFS (``ingestion/chunk_detector.cc``, ``Xor32Detector``) cuts a file larger than the
minimum chunk size at content-defined points: after at least ``minimum`` bytes, at the first
position ``i`` whose rolling checksum ``h_i = sum_k (b[i-k] << k) mod 2**32`` (XOR over the
32 bytes ending at ``i``) is within ``UINT32_MAX // average`` of ``0x7fffffff`` (as a wrapped
32-bit signed difference), or at ``maximum`` bytes. Byte ``i`` starts the next chunk.
The defaults are those of cvmfs_server: 4 / 8 / 16 MiB.

A byte-by-byte loop is far too slow in Python, so the search is done at C speed: bit ``j``
(``j >= 7``) of ``h_i`` is the parity ``D(i - j)`` of the diagonal ``bit_t(b[s + t])``,
``t = 0..7``, and every accepted checksum has bits ``B..30`` equal and bit 31 different
(``B`` = bit length of the threshold). ``D`` for a whole block is computed with a few big-int
shifts, candidates are found with ``bytes.find`` and each is checked exactly. The cut points
are therefore exactly those of the genuine detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

MIB = 1 << 20
WINDOW = 32
_MAGIC = 0x7FFFFFFF
_MASK = 0xFFFFFFFF
_PARITY = bytes(i & 1 for i in range(256))
_BLOCK = 1 << 20


@dataclass(frozen=True)
class ChunkParams:
    """Minimum, average and maximum chunk sizes (bytes)."""

    minimum: int = 4 * MIB
    average: int = 8 * MIB
    maximum: int = 16 * MIB

    def __post_init__(self) -> None:
        if not WINDOW <= self.minimum < self.average < self.maximum:
            raise ValueError("chunk sizes must satisfy 32 <= minimum < average < maximum")
        if self.threshold < 64:
            raise ValueError("average chunk size too large (threshold below 64)")

    @property
    def threshold(self) -> int:
        """``UINT32_MAX / average`` as cvmfs computes it."""
        return _MASK // self.average


DEFAULT_PARAMS = ChunkParams()


def accepts(checksum: int, threshold: int) -> bool:
    """The cvmfs cut test ``abs(int32(xor32) - 0x7fffffff) < threshold`` (32-bit wrap)."""
    diff = (checksum - _MAGIC) & _MASK
    if diff >= 1 << 31:
        diff -= 1 << 32
    return abs(diff) < threshold


def checksum_at(data: bytes | bytearray | memoryview, i: int) -> int:
    """xor32 over the 32 bytes ending at ``i`` (inclusive)."""
    h = 0
    for byte in data[i - WINDOW + 1 : i + 1]:
        h = ((h << 1) ^ byte) & _MASK
    return h


def _diagonals(data: bytes | bytearray | memoryview, start: int, stop: int) -> bytes:
    """``D(s)`` for ``s`` in ``[start, stop)`` as bytes 0/1 (needs ``data[start:stop+7]``)."""
    with memoryview(data) as view:
        x = int.from_bytes(view[start : stop + 7], "little")
    y = x ^ (x >> 9)
    y ^= y >> 18
    y ^= y >> 36
    return y.to_bytes(stop - start + 7, "little")[: stop - start].translate(_PARITY)


def _needles(params: ChunkParams) -> tuple[bytes, bytes, int]:
    """Diagonal-parity patterns that every accepted position ends (bits B..31)."""
    run = 31 - params.threshold.bit_length()  # bits B..30 equal, bit 31 different
    return b"\x01" + b"\x00" * run, b"\x00" + b"\x01" * run, run + 1


def _search(buf: bytes | bytearray | memoryview, first: int, end: int,
            params: ChunkParams) -> int | None:
    """First position in ``[first, end)`` of ``buf`` the detector accepts, or None."""
    zero_run, one_run, span = _needles(params)
    threshold = params.threshold
    lo = first - WINDOW + 1  # a pattern starts at i - 31
    hi = end - WINDOW + 1
    while lo < hi:
        top = min(hi, lo + _BLOCK)
        diag = _diagonals(buf, lo, top + span - 1)
        best: int | None = None
        for needle in (zero_run, one_run):
            pos = diag.find(needle)
            while pos != -1:
                i = lo + pos + WINDOW - 1
                if best is not None and i >= best:
                    break
                if accepts(checksum_at(buf, i), threshold):
                    best = i
                    break
                pos = diag.find(needle, pos + 1)
        if best is not None:
            return best
        lo = top
    return None


def cut_points(data: bytes | memoryview, params: ChunkParams = DEFAULT_PARAMS) -> list[int]:
    """End offsets of the chunks of ``data`` (``[len(data)]`` if it is not chunked)."""
    n = len(data)
    ends: list[int] = []
    last = 0
    while True:
        end = min(last + params.maximum, n)
        found = None
        if last + params.minimum < end:
            found = _search(data, last + params.minimum, end, params)
        if found is None:
            if n <= last + params.maximum:
                return [*ends, n]
            found = last + params.maximum
        ends.append(found)
        last = found


def split(data: bytes | memoryview, params: ChunkParams = DEFAULT_PARAMS) -> list[memoryview]:
    """The chunks of ``data`` as views (one element if it is not chunked)."""
    view = memoryview(data)
    starts = [0, *cut_points(view, params)]
    return [view[a:b] for a, b in pairwise(starts)]


class Chunker:
    """Cuts a stream into chunks; feed it data, collect chunks, then take the remainder."""

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._buf = bytearray()
        self._next = params.minimum  # next position (relative to the last cut) to test

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Add data; return the chunks completed by it."""
        self._buf += data
        chunks: list[bytes] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return chunks
            with memoryview(self._buf) as view:
                chunks.append(bytes(view[:cut]))
            del self._buf[:cut]
            self._next = self.params.minimum

    def finish(self) -> bytes:
        """The last chunk (all data not yet returned; may be empty)."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._next = self.params.minimum
        return rest

    def _find_cut(self) -> int | None:
        buf, params = self._buf, self.params
        end = min(params.maximum, len(buf))
        if self._next < end:
            found = _search(buf, self._next, end, params)
            if found is not None:
                return found
            self._next = end
        if len(buf) > params.maximum:
            return params.maximum
        return None
