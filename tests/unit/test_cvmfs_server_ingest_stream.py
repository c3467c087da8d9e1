"""The tar stream fed to ``cvmfs_server ingest``: checked, decompressed, with our record."""

from __future__ import annotations

import io
import tarfile

import pytest

from publisher.repositories.cvmfs_server.ingest_stream import IngestStream
from publisher.tarball import UnpackError, UnpackLimits
from publisher.tarball.unpack import unpack
from tests.helpers import make_tarball


def streamed(path, limits=UnpackLimits(), who="alice"):  # noqa: B008
    stream = IngestStream(path, who, limits)
    data = b"".join(stream.chunks())
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = {m.name: (m, tar.extractfile(m).read() if m.isfile() else None)
                   for m in tar.getmembers()}
    return stream, data, members


def add(tar, name, kind=tarfile.REGTYPE, data=b"", linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), linkname
    tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_members_pass_through_decompressed_with_the_record_last(tmp_path, mode):
    tarball = make_tarball(tmp_path / "t.tar", {"bin/run": b"#!/bin/sh\n", "d/f": b"x" * 5000},
                           mode=mode)
    stream, data, members = streamed(tarball)
    assert set(members) == {"bin/run", "d/f", ".publisher"}
    assert members["d/f"][1] == b"x" * 5000
    assert members[".publisher"][1] == b"alice\n"
    assert list(members)[-1] == ".publisher"
    assert data.endswith(bytes(1024)) and len(data) % 512 == 0
    stats = stream.stats()
    assert (stats.files, stats.bytes) == (2, 5010)
    assert stats.compression == {"w": "none", "w:gz": "gzip", "w:bz2": "bzip2", "w:xz": "xz"}[mode]


def test_long_names_links_and_pax_headers_pass(tmp_path):
    path = tmp_path / "t.tar"
    long = "a" * 120 + "/" + "b" * 120
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, long, data=b"1")
        add(tar, "dir", tarfile.DIRTYPE)
        add(tar, "dir/link", tarfile.SYMTYPE, linkname="../" + long)
        add(tar, "hard", tarfile.LNKTYPE, linkname=long)
        add(tar, "ünïcode", data=b"2")
    stream, _, members = streamed(path)
    assert members["dir/link"][0].linkname == "../" + long
    assert members["hard"][0].islnk() and "ünïcode" in members
    stats = stream.stats()
    # counted as the unpacker counts: the long name's implied parent is a directory too
    assert (stats.files, stats.directories, stats.symlinks, stats.hardlinks) == (2, 2, 1, 1)


def test_user_records_are_replaced_by_ours(tmp_path):
    tarball = make_tarball(tmp_path / "t.tar", {".publisher": b"mallory\n", ".cvmfscatalog": b"",
                                                "sub/.publisher": b"kept"}, mode="w")
    _, _, members = streamed(tarball)
    assert members[".publisher"][1] == b"alice\n"
    assert ".cvmfscatalog" not in members and members["sub/.publisher"][1] == b"kept"


@pytest.mark.parametrize(("name", "kind", "linkname", "why"), [
    ("../escape", tarfile.REGTYPE, "", "escapes the CID directory"),
    ("/etc/passwd", tarfile.REGTYPE, "", "absolute"),
    ("a/../../b", tarfile.REGTYPE, "", "escapes the CID directory"),
    ("new\nline", tarfile.REGTYPE, "", "control character"),
    ("link", tarfile.SYMTYPE, "", "symlink target is empty"),
    ("hard", tarfile.LNKTYPE, "../x", "escapes the CID directory"),
    ("dev", tarfile.CHRTYPE, "", "not allowed"),
    ("fifo", tarfile.FIFOTYPE, "", "not allowed"),
])
def test_hostile_members_are_rejected_before_ingest_sees_them(tmp_path, name, kind, linkname, why):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "fine", data=b"ok")
        add(tar, name, kind, linkname=linkname)
    stream = IngestStream(path, "alice", UnpackLimits())
    sent = []
    with pytest.raises(UnpackError, match=why) as err:
        for chunk in stream.chunks():
            sent.append(chunk)
    assert b"".join(sent).count(b"fine") == 1  # the good member went before the bad one
    with pytest.raises(UnpackError) as unpacked:  # the unpacker's answer, word for word
        unpack(path, tmp_path / "dest")
    assert str(unpacked.value) == str(err.value)


def test_limits_are_enforced(tmp_path):
    tarball = make_tarball(tmp_path / "t.tar", {f"f{i}": b"x" * 100 for i in range(10)}, mode="w")
    with pytest.raises(UnpackError, match="too many members"):
        streamed(tarball, UnpackLimits(max_members=5))
    with pytest.raises(UnpackError, match="exceeds the limit"):
        streamed(tarball, UnpackLimits(max_bytes=500))


def test_truncated_and_non_tar_input_are_rejected(tmp_path):
    tarball = make_tarball(tmp_path / "t.tar", {"f": b"x" * 3000}, mode="w")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tarball.read_bytes()[:1536])
    with pytest.raises(UnpackError, match="truncated"):
        streamed(cut)
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world" * 100)
    with pytest.raises(UnpackError):
        streamed(junk)
