"""TarReader.read_data (added for the cvmfs-native writer): whole, in pieces, skipped."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from publisher.tarball.decompress import UnpackError
from publisher.tarball.stream import REG, TarReader


class _Chunks:
    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.pos = data, size, 0

    def read(self) -> bytes:
        piece = self.data[self.pos:self.pos + self.size]
        self.pos += len(piece)
        return piece


def _archive(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("chunk", [1, 511, 512, 4096, 1 << 20])
def test_read_whole_in_pieces_or_not_at_all(chunk):
    rng = random.Random(chunk)
    files = {f"f{i}": rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000, 70000]))
             for i in range(12)}
    reader = TarReader(_Chunks(_archive(files), chunk), 1000, 1 << 20)
    got = {}
    for i, m in enumerate(reader):
        assert m.kind == REG
        if i % 3 == 0:
            got[m.name.decode()] = reader.read_data(m.size)
        elif i % 3 == 1:
            parts, left = [], m.size
            while left:
                piece = min(left, 1024)
                parts.append(reader.read_data(piece))
                left -= piece
            got[m.name.decode()] = b"".join(parts)
        # i % 3 == 2: not read at all, skipped by the iteration
    assert got == {n: d for i, (n, d) in enumerate(files.items()) if i % 3 != 2}


def test_read_data_refuses_unaligned_pieces_and_reports_truncation():
    data = _archive({"a": b"x" * 1000})
    reader = TarReader(_Chunks(data, 4096), 10, 1 << 20)
    member = next(iter(reader))
    with pytest.raises(ValueError, match="512-byte multiples"):
        reader.read_data(100)
    with pytest.raises(ValueError):
        reader.read_data(member.size + 1)
    truncated = TarReader(_Chunks(data[:700], 4096), 10, 1 << 20)
    next(iter(truncated))
    with pytest.raises(UnpackError, match="truncated"):
        truncated.read_data(1000)
