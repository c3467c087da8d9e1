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


class Chunker:
    """Cuts a stream into chunks; feed it data, collect chunks, then take the remainder."""

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._buf = bytearray()
        self._next = params.minimum  # next position (relative to the last cut) to test
        low = params.threshold.bit_length()
        run = 31 - low  # bits low..30 must be equal, bit 31 different
        self._needles = (b"\x01" + b"\x00" * run, b"\x00" + b"\x01" * run)
        self._run = run

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
            found = self._search(self._next, end)
            if found is not None:
                return found
            self._next = end
        if len(buf) > params.maximum:
            return params.maximum
        return None

    def _search(self, first: int, end: int) -> int | None:
        """First accepted position in ``[first, end)``, or None."""
        buf, threshold, span = self._buf, self.params.threshold, self._run + 1
        lo = first - WINDOW + 1  # needle start p = i - 31
        hi = end - WINDOW + 1
        while lo < hi:
            top = min(hi, lo + _BLOCK)
            diag = _diagonals(buf, lo, top + span - 1)
            best: int | None = None
            for needle in self._needles:
                pos = diag.find(needle, 0, top - lo + span - 1)
                while pos != -1:
                    i = lo + pos + WINDOW - 1
                    if best is not None and i >= best:
                        break
                    if accepts(checksum_at(buf, i), threshold):
                        best = i
                        break
                    pos = diag.find(needle, pos + 1, top - lo + span - 1)
            if best is not None:
                return best
            lo = top
        return None


def split(data: bytes, params: ChunkParams = DEFAULT_PARAMS) -> list[bytes]:
    """All chunks of ``data`` (one element if it is not larger than the minimum)."""
    if len(data) <= params.minimum:
        return [data]
    chunker = Chunker(params)
    chunks = chunker.feed(data)
    rest = chunker.finish()
    return [*chunks, rest] if rest else chunks
