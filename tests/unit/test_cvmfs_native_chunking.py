"""Chunking: cut points exactly those of cvmfs's Xor32Detector, and content-defined."""

from __future__ import annotations

import random

import pytest

from publisher.repositories.cvmfs_native.chunking import DEFAULT_PARAMS, Chunker, ChunkParams, split


def reference_cuts(data: bytes, p: ChunkParams) -> list[int]:
    """A literal transcription of Xor32Detector (byte loop); returns chunk end offsets."""
    threshold = 0xFFFFFFFF // p.average
    if len(data) <= p.minimum:
        return [len(data)]
    ends, last = [], 0
    while True:
        h, cut = 0, None
        for i in range(last + p.minimum - 32, min(len(data), last + p.maximum)):
            h = ((h << 1) ^ data[i]) & 0xFFFFFFFF
            diff = (h - 0x7FFFFFFF) & 0xFFFFFFFF
            diff = diff - (1 << 32) if diff >= 1 << 31 else diff
            if i >= last + p.minimum and abs(diff) < threshold:
                cut = i
                break
        else:
            if last + p.maximum < len(data):
                cut = last + p.maximum
        if cut is None:
            return [*ends, len(data)]
        ends.append(cut)
        last = cut


def streamed_cuts(data: bytes, p: ChunkParams, rng: random.Random) -> list[int]:
    if len(data) <= p.minimum:
        return [len(data)]
    chunker, ends, pos, off = Chunker(p), [], 0, 0
    while off < len(data):
        step = rng.randint(1, 3 * p.maximum)
        for chunk in chunker.feed(data[off:off + step]):
            pos += len(chunk)
            ends.append(pos)
        off += step
    rest = chunker.finish()
    return [*ends, pos + len(rest)] if rest else ends


def _data(kind: str, n: int, rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    if kind == "ones":
        return b"\x01" * n
    if kind == "text":
        return bytes(rng.choice(b"abc de\n") for _ in range(n))
    return (rng.randbytes(300) + bytes(500)) * (n // 800 + 1)


@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "text", "mixed"])
@pytest.mark.parametrize("params", [ChunkParams(64, 256, 1024), ChunkParams(100, 1000, 3000),
                                    ChunkParams(4096, 8192, 16384)])
def test_cut_points_equal_the_cvmfs_detector(kind, params):
    rng = random.Random(f"{kind}{params}")
    for n in (0, params.minimum, params.minimum + 1, 7 * params.maximum + 3,
              rng.randint(1, 40 * params.maximum)):
        data = _data(kind, n, rng)
        expected = reference_cuts(data, params)
        assert streamed_cuts(data, params, rng) == expected
        pieces = split(data, params)
        assert b"".join(pieces) == data
        assert [sum(len(c) for c in pieces[: i + 1]) for i in range(len(pieces))] == expected


def test_default_sizes_and_resynchronisation_after_an_insertion():
    rng = random.Random(3)
    data = rng.randbytes(96 << 20)
    chunks = split(data)
    assert all(DEFAULT_PARAMS.minimum <= len(c) <= DEFAULT_PARAMS.maximum for c in chunks[:-1])
    assert 6 <= len(chunks) <= 20
    edited = data[:1000] + b"inserted bytes" + data[1000:]
    again = split(edited)
    assert len(set(chunks) & set(again)) >= len(chunks) - 2  # only the first chunks change


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="minimum < average < maximum"):
        ChunkParams(8, 16, 32)
    with pytest.raises(ValueError, match="minimum < average < maximum"):
        ChunkParams(4096, 4096, 8192)
    with pytest.raises(ValueError, match="too large"):
        ChunkParams(1 << 20, 1 << 27, 1 << 28)
