"""Tests of publisher.tarball.unpack: round trips, formats, permissions and every hostile class."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from publisher.tarball import UnpackError, UnpackLimits, UnpackStats, detect_compression
from publisher.tarball.decompress import ChunkSource, open_chunks
from publisher.tarball.stream import REG, TarReader, parse_pax
from publisher.tarball.unpack import unpack
from tests.hostile import (
    CASE_LIMITS,
    EXPECTED_ERRORS,
    HOSTILE_CASES,
    MTIME,
    SENTINEL,
    Entry,
    compress,
    dir_,
    hard,
    info,
    reg,
    sym,
    tar_bytes,
)
from tests.requirements import tool

COMPRESSIONS = ["gzip", "bzip2", "xz", "zstd", "none"]


def write_tarball(
    path: Path, entries: list[Entry], compression: str = "gzip", fmt: int = tarfile.GNU_FORMAT
) -> Path:
    path.write_bytes(compress(tar_bytes(entries, fmt), compression))
    return path


def sample_entries() -> list[Entry]:
    """A tree with every supported member kind and awkward modes."""
    big = bytes(range(256)) * 12_000 + b"tail"  # ~3 MiB: spans several chunks
    return [
        dir_("./"),
        dir_("top/", 0o700),
        reg("top/hello.txt", b"hello\n"),
        reg("top/run.sh", b"#!/bin/sh\n", 0o4750),  # setuid + exec for owner only
        reg("top/secret", b"s", 0o600),
        reg("top/empty", b""),
        reg("top/big.bin", big),
        dir_("top/emptydir/", 0o1777),
        dir_("ro/", 0o555),
        reg("ro/inside.txt", b"inside"),
        reg("implicit/parents/deep/file.txt", b"deep"),
        sym("top/link", "hello.txt"),
        sym("implicit/parents/up", "../../top/hello.txt"),
        sym("dangling", "does/not/exist"),
        hard("top/hard", "top/hello.txt"),
        reg("./dotted/name.txt", b"dot"),
        reg("unicodé/ファイル.txt", "ü".encode()),
    ]


def check_sample(dest: Path) -> None:
    def mode(p: Path) -> int:
        return stat.S_IMODE(p.lstat().st_mode)

    assert (dest / "top/hello.txt").read_bytes() == b"hello\n"
    assert mode(dest / "top/hello.txt") == 0o644
    assert mode(dest / "top/run.sh") == 0o755
    assert mode(dest / "top/secret") == 0o644
    assert (dest / "top/empty").stat().st_size == 0
    assert (dest / "top/big.bin").read_bytes() == bytes(range(256)) * 12_000 + b"tail"
    assert mode(dest / "top") == 0o755
    assert mode(dest / "top/emptydir") == 0o777  # sticky dropped, | 0o755
    assert list((dest / "top/emptydir").iterdir()) == []
    assert mode(dest / "ro") == 0o755
    assert (dest / "ro/inside.txt").read_bytes() == b"inside"
    assert (dest / "implicit/parents/deep/file.txt").read_bytes() == b"deep"
    assert mode(dest / "implicit/parents") == 0o755
    assert os.readlink(dest / "top/link") == "hello.txt"
    assert (dest / "implicit/parents/up").read_bytes() == b"hello\n"
    assert os.readlink(dest / "dangling") == "does/not/exist"
    assert (dest / "top/hard").stat().st_ino == (dest / "top/hello.txt").stat().st_ino
    assert (dest / "dotted/name.txt").read_bytes() == b"dot"
    assert (dest / "unicodé/ファイル.txt").read_text() == "ü"
    for p in [
        dest / "top/hello.txt",
        dest / "top/big.bin",
        dest / "top",
        dest / "ro",
        dest / "top/emptydir",
        dest,
        dest / "top/link",
    ]:
        assert p.lstat().st_mtime == MTIME, p
    for root, _dirs, files in os.walk(dest):
        for name in files:
            assert not (Path(root, name).lstat().st_mode & 0o7000)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip(tmp_path: Path, compression: str) -> None:
    src = write_tarball(tmp_path / "in.bin", sample_entries(), compression)
    stats = unpack(src, tmp_path / "dest")
    check_sample(tmp_path / "dest")
    assert stats == UnpackStats(
        compression=compression,
        files=9,
        directories=8,
        symlinks=3,
        hardlinks=1,
        bytes=6 + 10 + 1 + 3_072_004 + 6 + 4 + 3 + 2,
    )


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_formats_and_long_names(tmp_path: Path, fmt: int) -> None:
    longdir = "/".join(["d" * 60] * 3)  # 182 bytes: ustar prefix / GNU L / pax path
    target = "x" * 120  # long link target: GNU K / pax linkpath
    entries = [reg(f"{longdir}/file.txt", b"long"), sym(f"{longdir}/s", "file.txt")]
    if fmt != tarfile.USTAR_FORMAT:
        entries += [reg(target, b"t"), sym("longlink", target)]
    src = write_tarball(tmp_path / "t", entries, "none", fmt)
    unpack(src, tmp_path / "dest")
    assert (tmp_path / "dest" / longdir / "file.txt").read_bytes() == b"long"
    assert (tmp_path / "dest" / longdir / "s").read_bytes() == b"long"
    if fmt != tarfile.USTAR_FORMAT:
        assert os.readlink(tmp_path / "dest/longlink") == target


def test_pax_mtime_size_and_global_header(tmp_path: Path) -> None:
    ti = info("frac.txt", size=3)
    ti.mtime = 1_600_000_000.25  # type: ignore[assignment]
    body = b"comment=abc\n"
    rec = b"%d %s" % (len(body) + 3, body)
    glob = info("pax_global_header", b"g", size=len(rec))
    data = tar_bytes([(glob, rec), (ti, b"abc")], tarfile.PAX_FORMAT)
    src = tmp_path / "p.tar"
    src.write_bytes(data)
    unpack(src, tmp_path / "dest")
    st = (tmp_path / "dest/frac.txt").stat()
    assert st.st_mtime_ns == 1_600_000_000_250_000_000
    assert parse_pax(b"16 path=a/b/cde\n") == {b"path": b"a/b/cde"}
    with pytest.raises(UnpackError, match="malformed pax"):
        parse_pax(b"99 path=x\n")


def test_negative_mtime_and_base256_size(tmp_path: Path) -> None:
    ti = info("old.txt", size=2)
    ti.mtime = -86400
    src = write_tarball(tmp_path / "t", [(ti, b"ok")], "none")
    unpack(src, tmp_path / "dest")
    assert (tmp_path / "dest/old.txt").stat().st_mtime == -86400


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz", "zstd"])
def test_detection_ignores_file_name(tmp_path: Path, compression: str) -> None:
    src = write_tarball(tmp_path / "misleading.zip", [reg("a", b"1")], compression)
    assert detect_compression(src.read_bytes()[:512]) == compression
    assert unpack(src, tmp_path / "dest").compression == compression


def test_detect_compression_magic() -> None:
    plain = tar_bytes([reg("a")])
    assert detect_compression(plain) == "none"
    assert detect_compression(bytes(1024)) == "none"
    assert detect_compression(b"\x1f\x8b\x08") == "gzip"
    assert detect_compression(b"BZh9") == "bzip2"
    assert detect_compression(b"\xfd7zXZ\x00\x00") == "xz"
    assert detect_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert detect_compression(b"\x50\x2a\x4d\x18") == "zstd"  # skippable frame
    for bad, why in [
        (b"", "empty file"),
        (b"PK\x03\x04" + bytes(600), "zip"),
        (b"hello", "too short"),
        (b"x" * 600, "unrecognised"),
    ]:
        with pytest.raises(UnpackError, match=why):
            detect_compression(bad)


def _assert_clean(parent: Path, expected: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} <= expected


@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile(tmp_path: Path, case: str) -> None:
    src = HOSTILE_CASES[case](tmp_path)
    parent = tmp_path / "parent"
    sentinel = parent / SENTINEL
    sentinel.mkdir(parents=True)
    (sentinel / "secret").write_text("keep")
    limits = UnpackLimits(**CASE_LIMITS.get(case, {}))
    threads = threading.active_count()
    with pytest.raises(UnpackError) as err:
        unpack(src, parent / "dest", limits)
    msg = str(err.value)
    assert EXPECTED_ERRORS[case] in msg
    assert "\n" not in msg and msg.isprintable()
    _assert_clean(parent, {"dest", SENTINEL})
    assert [p.name for p in sentinel.iterdir()] == ["secret"]
    assert (sentinel / "secret").read_text() == "keep"
    assert stat.S_IMODE(sentinel.stat().st_mode) == 0o755
    assert threading.active_count() == threads  # the decompressor stopped
    shutil.rmtree(parent / "dest", ignore_errors=True)


def test_hostile_table_is_consistent() -> None:
    assert set(HOSTILE_CASES) == set(EXPECTED_ERRORS)
    assert set(CASE_LIMITS) <= set(HOSTILE_CASES)


def test_duplicates_follow_tar_semantics(tmp_path: Path) -> None:
    entries = [
        reg("f", b"first"),
        hard("h", "f"),
        reg("f", b"second"),  # h keeps the old inode
        reg("s", b"file"),
        sym("s", "f"),  # a symlink may replace a file ...
        sym("t", "f"),
        reg("t", b"plain"),  # ... and a file a symlink
        dir_("d/", 0o700),
        reg("d/x", b"x"),
        dir_("d/", 0o750),  # the last dir mode wins
    ]
    src = write_tarball(tmp_path / "t", entries)
    stats = unpack(src, tmp_path / "dest")
    dest = tmp_path / "dest"
    assert (dest / "f").read_bytes() == b"second"
    assert (dest / "h").read_bytes() == b"first"
    assert os.readlink(dest / "s") == "f"
    assert not (dest / "t").is_symlink() and (dest / "t").read_bytes() == b"plain"
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755
    assert stats.files == 5 and stats.hardlinks == 1 and stats.symlinks == 2


def test_symlink_relative_inside_allowed(tmp_path: Path) -> None:
    entries = [
        dir_("a/b/"),
        reg("a/t", b"t"),
        sym("a/b/up", "../t"),
        sym("a/b/self", "."),
        sym("a/b/wiggle", "../b/../t"),
        sym("root", "a/b/.."),
    ]
    unpack(write_tarball(tmp_path / "t", entries), tmp_path / "dest")
    assert (tmp_path / "dest/a/b/wiggle").read_bytes() == b"t"
    assert (tmp_path / "dest/root/t").read_bytes() == b"t"


def test_umask_does_not_change_modes(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        unpack(write_tarball(tmp_path / "t", sample_entries()), tmp_path / "dest")
    finally:
        os.umask(old)
    check_sample(tmp_path / "dest")


def test_dest_rules(tmp_path: Path) -> None:
    src = write_tarball(tmp_path / "t", [reg("a", b"1")])
    (tmp_path / "empty").mkdir()
    unpack(src, tmp_path / "empty")
    assert (tmp_path / "empty/a").read_bytes() == b"1"
    with pytest.raises(FileExistsError):
        unpack(src, tmp_path / "empty")
    (tmp_path / "realdir").mkdir()
    (tmp_path / "linkdir").symlink_to("realdir")
    with pytest.raises(FileExistsError):
        unpack(src, tmp_path / "linkdir")
    assert list((tmp_path / "realdir").iterdir()) == []


def test_trailing_data_after_end_marker(tmp_path: Path) -> None:
    data = tar_bytes([reg("a", b"1")]) + b"junk after the end" + bytes(100_000)
    src = tmp_path / "t"
    src.write_bytes(compress(data, "gzip"))
    assert unpack(src, tmp_path / "dest").files == 1
    src.write_bytes(compress(tar_bytes([reg("a", b"1")]) + bytes(65 << 20), "zstd"))
    with pytest.raises(UnpackError, match="after the end-of-archive"):
        unpack(src, tmp_path / "dest2")


def test_limits_exactly_at_the_edge(tmp_path: Path) -> None:
    src = write_tarball(tmp_path / "t", [reg("a", b"12345"), reg("b/c", b"67890")])
    stats = unpack(src, tmp_path / "ok", UnpackLimits(max_members=3, max_bytes=10))
    assert stats.bytes == 10
    with pytest.raises(UnpackError, match="too many members"):
        unpack(src, tmp_path / "n", UnpackLimits(max_members=2))
    with pytest.raises(UnpackError, match="exceeds the limit of 9 bytes"):
        unpack(src, tmp_path / "b", UnpackLimits(max_bytes=9))


class _Dribble:
    """A ChunkSource that hands out *data* in tiny, odd-sized chunks."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.pos, self.size = data, 0, size

    def read(self) -> bytes:
        chunk = self.data[self.pos : self.pos + self.size]
        self.pos += len(chunk)
        return chunk


@pytest.mark.parametrize("size", [1, 7, 511, 513, 4099])
def test_reader_handles_any_chunking(tmp_path: Path, size: int) -> None:
    entries = [reg(f"f{i}", bytes([i]) * (i * 97)) for i in range(12)]
    entries.append(reg("n" * 150, b"longname"))
    src: ChunkSource = _Dribble(tar_bytes(entries, tarfile.PAX_FORMAT), size)
    got = {}
    reader = TarReader(src, 1000, 1 << 20)
    for m in reader:
        assert m.kind == REG
        if m.name == b"f5":
            continue  # data not consumed: skipped
        r, w = os.pipe()
        reader.copy_to(w)
        os.close(w)
        got[m.name] = os.read(r, 1 << 20)
        os.close(r)
    assert got == {ti.name.encode(): data for ti, data in entries if ti.name != "f5"}


@pytest.mark.parametrize("use_programs", [True, False])
def test_bzip2_with_and_without_lbzip2(tmp_path: Path, use_programs: bool) -> None:
    if use_programs:
        tool("lbzip2")  # else the fallback would be tested twice
    payload = tar_bytes([reg("a", os.urandom(300_000)), reg("b", b"b")])
    src = tmp_path / "t.bz2"
    src.write_bytes(compress(payload, "bzip2") + compress(tar_bytes([]), "bzip2"))  # 2 streams
    out = bytearray()
    with open(src, "rb") as f, open_chunks(f, "bzip2", use_programs=use_programs) as chunks:
        while data := chunks.read():
            out += data
    assert bytes(out) == payload + tar_bytes([])
    src.write_bytes(compress(payload, "bzip2")[:-100])
    with (
        pytest.raises(UnpackError, match="truncated"),
        open(src, "rb") as f,
        open_chunks(f, "bzip2", use_programs=use_programs) as chunks,
    ):
        while chunks.read():
            pass


def test_multi_member_gzip(tmp_path: Path) -> None:
    data = tar_bytes([reg("a", b"1" * 5000), reg("b", b"2")])
    src = tmp_path / "t.gz"
    src.write_bytes(compress(data[:3000], "gzip") + compress(data[3000:], "gzip"))
    unpack(src, tmp_path / "dest")
    assert (tmp_path / "dest/b").read_bytes() == b"2"


@pytest.mark.skipif(not shutil.which("tar"), reason="tar is not installed (Debian package tar: "
                    "make system-deps)")
def test_same_tree_as_gnu_tar(tmp_path: Path) -> None:
    from tests.bench.corpus import make_corpus

    corpus = make_corpus(tmp_path / "cache", scale=0.01)
    (corpus / "lib/link.so").symlink_to(
        "large00.bin" if (corpus / "lib/large00.bin").exists() else "../bin/large00.bin"
    )
    os.link(corpus / "bin/large00.bin", corpus / "bin/hard.bin")
    tarball = tmp_path / "c.tar.gz"
    subprocess.run(
        [
            "tar",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-czf",
            str(tarball),
            "-C",
            str(corpus.parent),
            corpus.name,
        ],
        check=True,
    )
    (tmp_path / "ref").mkdir()
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tmp_path / "ref")], check=True)
    stats = unpack(tarball, tmp_path / "ours")
    assert stats.files > 250 and stats.hardlinks == 1 and stats.symlinks == 1

    def listing(root: Path) -> list[tuple[str, int, int, int, bytes]]:
        out = []
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(dirpath, name)
                st = p.lstat()
                body = (
                    os.readlink(p).encode()
                    if p.is_symlink()
                    else p.read_bytes()
                    if p.is_file()
                    else b""
                )
                out.append(
                    (str(p.relative_to(root)), st.st_mode, int(st.st_mtime), st.st_nlink, body)
                )
        return sorted(out)

    assert listing(tmp_path / "ours") == listing(tmp_path / "ref")


def test_old_style_directory_entries(tmp_path: Path) -> None:
    old_dir = info("olddir/", tarfile.AREGTYPE, mode=0o755)
    bad = info("notadir/", size=1)
    src = write_tarball(tmp_path / "t", [(old_dir, None), reg("olddir/f", b"f")])
    unpack(src, tmp_path / "dest")
    assert (tmp_path / "dest/olddir").is_dir()
    with pytest.raises(UnpackError, match="ends with '/'"):
        unpack(write_tarball(tmp_path / "t2", [(bad, b"x")]), tmp_path / "dest2")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_truncated_large_file_closes_everything(tmp_path: Path) -> None:
    data = compress(tar_bytes([reg("big", os.urandom(3 << 20)), reg("after", b"x")]), "gzip")
    src = tmp_path / "t.gz"
    src.write_bytes(data[: len(data) // 2])
    fds, threads = _open_fds(), threading.active_count()
    with pytest.raises(UnpackError, match="truncated gzip stream"):
        unpack(src, tmp_path / "dest")
    assert _open_fds() == fds and threading.active_count() == threads


def test_write_errors_of_the_writer_thread_surface(tmp_path: Path) -> None:
    import errno
    import resource

    src = write_tarball(tmp_path / "t", [reg("big", bytes(3 << 20)), reg("after", b"x")])
    fds, threads = _open_fds(), threading.active_count()
    soft, hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard_limit))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(OSError) as err:
            unpack(src, tmp_path / "dest")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard_limit))
    assert err.value.errno == errno.EFBIG
    assert _open_fds() == fds and threading.active_count() == threads
