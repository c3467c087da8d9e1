"""Builders of bad and hostile tarballs, shared by the unpack, spool and publisher tests.

``HOSTILE_CASES[name](directory) -> Path`` writes one tarball into *directory* and returns its
path. ``EXPECTED_ERRORS[name]`` is a substring of the ``UnpackError`` message it must produce,
and ``CASE_LIMITS[name]`` (when present) holds the ``UnpackLimits`` keyword arguments the case
needs (small limits keep the bombs small).

Symlink and hard-link attacks aim at ``../sentinel``: put *dest* and a directory named
``SENTINEL`` side by side in one parent and check that the sentinel is untouched afterwards.

Symlinks are kept as GNU tar keeps them, wherever they point: ``KEPT_CASES[name]`` are archives
whose symlinks lead out of the CID directory (absolute, ``..``, chains, on the publisher's own
names) and must be stored as they are, with ``KEPT_SYMLINKS[name]`` ({path: target}) and no
byte written through any of them. Only writing *through* a symlink is hostile.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import zstandard

SENTINEL = "sentinel"
MTIME = 1_700_000_000
Entry = tuple[tarfile.TarInfo, bytes | None]


def info(
    name: str | bytes,
    kind: bytes = tarfile.REGTYPE,
    *,
    size: int = 0,
    link: str = "",
    mode: int = 0o644,
) -> tarfile.TarInfo:
    """A TarInfo; a bytes *name* may hold any bytes (invalid UTF-8 included)."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.linkname = link
    ti.mode = mode
    ti.mtime = MTIME
    return ti


def reg(name: str | bytes, data: bytes = b"x", mode: int = 0o644) -> Entry:
    return info(name, size=len(data), mode=mode), data


def dir_(name: str, mode: int = 0o755) -> Entry:
    return info(name, tarfile.DIRTYPE, mode=mode), None


def sym(name: str, target: str) -> Entry:
    return info(name, tarfile.SYMTYPE, link=target, mode=0o777), None


def hard(name: str, target: str) -> Entry:
    return info(name, tarfile.LNKTYPE, link=target), None


def tar_bytes(entries: list[Entry], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """An uncompressed tar of *entries* (written by tarfile, which does not sanitise names)."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    """*data* compressed as "gzip", "bzip2", "xz", "zstd" or "none"."""
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "bzip2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _writer(name: str, make: Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = Path(directory) / name
        path.write_bytes(make())
        return path

    build.__name__ = f"build_{name}"
    return build


def _gz(entries: list[Entry], fmt: int = tarfile.GNU_FORMAT) -> Callable[[], bytes]:
    return lambda: compress(tar_bytes(entries, fmt), "gzip")


def _raw_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with arbitrary *name* bytes and a raw size field, valid checksum."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:124] = b"0000000\x000000000\0"
    h[124:136] = size_field
    h[136:148] = b"%011o\0" % MTIME
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _declared_bomb() -> bytes:
    # 1 TB declared in GNU base-256; no data follows (it must be refused before reading any).
    size = b"\x80" + (10**12).to_bytes(11, "big")
    return compress(_raw_header(b"huge.bin", size) + bytes(1024), "gzip")


def _truncated(compression: str) -> Callable[[], bytes]:
    def make() -> bytes:
        entries = [reg(f"f{i:03d}.txt", (b"line %d\n" % i) * 2000) for i in range(20)]
        data = compress(tar_bytes(entries), compression)
        return data[: len(data) // 2]

    return make


def _corrupt_gzip() -> bytes:
    good = compress(tar_bytes([reg(f"f{i}", bytes(range(256)) * 400) for i in range(8)]), "gzip")
    mid = len(good) // 2
    return good[:mid] + bytes(b ^ 0x5A for b in good[mid : mid + 64]) + good[mid + 64 :]


def _bad_checksum() -> bytes:
    data = bytearray(tar_bytes([reg("a", b"1"), reg("b", b"2")]))
    data[1024 + 10] ^= 0x01  # second header (after a's header + one data block)
    return compress(bytes(data), "gzip")


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "hello")
    return buf.getvalue()


def _no_end_marker() -> bytes:
    return tar_bytes([reg("a", b"hello")])[:1024]


def _pax_nul() -> bytes:
    ti = info("ok")
    ti.pax_headers = {"path": "bad\0name"}
    return tar_bytes([(ti, b"")], tarfile.PAX_FORMAT)


def _pax_global_escape() -> bytes:
    body = b"path=../evil\n"
    rec = b"%d %s" % (len(body) + 3, body)  # 2-digit length + space
    g = _raw_header(b"pax_global_header", b"%011o\0" % len(rec), b"g")
    pad = bytes(-len(rec) % 512)
    return compress(g + rec + pad + tar_bytes([reg("innocent", b"x")]), "gzip")


def _sparse() -> bytes:
    return compress(_raw_header(b"sparse.bin", b"%011o\0" % 0, b"S") + bytes(1024), "gzip")


def _gzip_bomb() -> bytes:
    return compress(tar_bytes([reg("zeros", bytes(64 << 20))]), "gzip")  # 64 MiB -> 64 KiB


def _gzip_bomb_many() -> bytes:
    return compress(tar_bytes([reg(f"z{i}", bytes(4 << 20)) for i in range(8)]), "gzip")


def _many(n: int) -> list[Entry]:
    return [reg(f"d/f{i:05d}", b"") for i in range(n)]


_CASES: dict[str, tuple[Callable[[], bytes], str, dict[str, int]]] = {
    "traversal": (_gz([reg("../evil.txt")]), "escapes the CID directory", {}),
    "traversal_nested": (_gz([reg("a/b/../../../evil")]), "escapes the CID directory", {}),
    "traversal_longname": (_gz([reg("../" + "x" * 150)]), "escapes the CID directory", {}),
    "traversal_pax_global": (_pax_global_escape, "escapes the CID directory", {}),
    "absolute_path": (_gz([reg("/tmp/evil.txt")]), "absolute path", {}),
    "nul_in_name": (lambda: compress(_pax_nul(), "gzip"), "NUL", {}),
    "newline_in_name": (_gz([reg("a\nb.txt")]), "control character", {}),
    "invalid_utf8_name": (_gz([reg(b"caf\xe9.txt")]), "not valid UTF-8", {}),
    "path_too_long": (_gz([reg("/".join(["d" * 200] * 25))]), "too long", {}),
    "component_too_long": (_gz([reg("a/" + "n" * 300)]), "longer than 255", {}),
    "symlink_then_write": (
        _gz([dir_("d/"), sym("link", "d"), reg("link/pwned")]),
        "goes through a symlink",
        {},
    ),
    "symlink_escape_then_write": (
        _gz([sym("link", "../" + SENTINEL), reg("link/pwned")]),
        "goes through a symlink",
        {},
    ),
    "symlink_absolute_then_write": (
        _gz([sym("link", "/tmp"), reg("link/pwned")]),
        "goes through a symlink",
        {},
    ),
    "symlink_then_dir_below": (
        _gz([sym("l", "../" + SENTINEL), dir_("l/x/")]),
        "goes through a symlink",
        {},
    ),
    "symlink_chain_then_write": (
        _gz([dir_("a/b/"), sym("a/b/up", "../.."), sym("x", "a/b/up/../" + SENTINEL),
             reg("x/pwned")]),
        "goes through a symlink",
        {},
    ),
    "symlink_target_empty": (_gz([sym("l", "")]), "symlink target is empty", {}),
    "symlink_target_del": (_gz([sym("l", "a\x7fb")]), "symlink target contains a control", {}),
    "symlink_target_c1": (_gz([sym("l", "a\u0085b")]), "symlink target contains a control", {}),
    "symlink_target_too_long": (_gz([sym("l", "a/" * 2100)]), "symlink target too long", {}),
    "symlink_replaced_by_dir": (
        _gz([dir_("d/"), sym("x", "d"), dir_("x/"), reg("x/pwned")]),
        "would replace a symlink with a directory",
        {},
    ),
    "dir_replaced_by_symlink": (
        _gz([dir_("d/"), reg("d/f"), dir_("e/"), sym("d", "e"), reg("d/g")]),
        "would replace a directory with a symlink",
        {},
    ),
    "dir_replaced_by_escaping_symlink": (
        _gz([dir_("d/"), reg("d/f"), sym("d", "../" + SENTINEL), reg("d/g")]),
        "would replace a directory with a symlink",
        {},
    ),
    "dir_replaced_by_file": (
        _gz([dir_("d/"), reg("d")]),
        "would replace a directory with a file",
        {},
    ),
    "file_replaced_by_dir": (_gz([reg("f"), dir_("f/")]), "would replace a file", {}),
    "file_as_parent": (_gz([reg("f"), reg("f/g")]), "goes through a file", {}),
    "hardlink_outside": (_gz([hard("h", "../" + SENTINEL + "/secret")]), "escapes", {}),
    "hardlink_absolute": (_gz([hard("h", "/etc/passwd")]), "is absolute", {}),
    "hardlink_missing": (_gz([hard("h", "nonexistent")]), "not a file extracted earlier", {}),
    "hardlink_to_symlink": (
        _gz([reg("f"), sym("s", "f"), hard("h", "s")]),
        "not a file extracted earlier",
        {},
    ),
    "hardlink_to_escaping_symlink": (
        _gz([sym("s", "../" + SENTINEL + "/secret"), hard("h", "s")]),
        "not a file extracted earlier",
        {},
    ),
    "hardlink_to_absolute_symlink": (
        _gz([sym("s", "/etc/passwd"), hard("h", "s")]),
        "not a file extracted earlier",
        {},
    ),
    "hardlink_to_dir": (_gz([dir_("d/"), hard("h", "d")]), "not a file extracted earlier", {}),
    "char_device": (_gz([(info("tty", tarfile.CHRTYPE), None)]), "character device", {}),
    "block_device": (_gz([(info("sda", tarfile.BLKTYPE), None)]), "block device", {}),
    "fifo": (_gz([(info("pipe", tarfile.FIFOTYPE), None)]), "fifo", {}),
    "sparse": (_sparse, "sparse", {}),
    "member_bomb": (_gz(_many(300)), "too many members", {"max_members": 200}),
    "declared_size_bomb": (_declared_bomb, "exceeds the limit", {}),
    "gzip_bomb": (_gzip_bomb, "exceeds the limit", {"max_bytes": 16 << 20}),
    "gzip_bomb_many": (_gzip_bomb_many, "exceeds the limit", {"max_bytes": 16 << 20}),
    "truncated_gzip": (_truncated("gzip"), "truncated", {}),
    "truncated_bzip2": (_truncated("bzip2"), "truncated", {}),
    "truncated_xz": (_truncated("xz"), "truncated", {}),
    "truncated_zstd": (_truncated("zstd"), "truncated", {}),
    "truncated_tar": (_truncated("none"), "truncated", {}),
    "no_end_marker": (_no_end_marker, "no end-of-archive marker", {}),
    "corrupt_gzip": (_corrupt_gzip, "corrupt gzip stream", {}),
    "bad_checksum": (_bad_checksum, "bad header checksum", {}),
    "garbage": (lambda: b"this is not an archive\n" * 100, "not a tar archive", {}),
    "gzip_of_text": (lambda: compress(b"hello world\n" * 100, "gzip"), "not a tar archive", {}),
    "empty_file": (lambda: b"", "empty file", {}),
    "zip_file": (_zip, "zip archive", {}),
}

HOSTILE_CASES: dict[str, Callable[[Path], Path]] = {
    name: _writer(name + ".tar.gz", make) for name, (make, _, _) in _CASES.items()
}
EXPECTED_ERRORS: dict[str, str] = {name: err for name, (_, err, _) in _CASES.items()}
CASE_LIMITS: dict[str, dict[str, int]] = {name: lim for name, (_, _, lim) in _CASES.items() if lim}


# Symlinks that lead out of the CID directory, kept as GNU tar keeps them.
_KEPT: dict[str, tuple[Callable[[], bytes], dict[str, str]]] = {
    "virtualenv": (
        _gz([dir_("env/bin/"), sym("env/bin/python", "/usr/bin/python3"),
             sym("env/bin/python3", "python"), reg("env/bin/activate", b"# venv\n"),
             sym("env/lib64", "lib"), dir_("env/lib/")]),
        {"env/bin/python": "/usr/bin/python3", "env/bin/python3": "python",
         "env/lib64": "lib"}),
    "escaping": (_gz([sym("link", "../" + SENTINEL), dir_("a/"),
                      sym("a/l", "../../" + SENTINEL + "/secret"), reg("f", b"data")]),
                 {"link": "../" + SENTINEL, "a/l": "../../" + SENTINEL + "/secret"}),
    "absolute": (_gz([sym("etc", "/etc"), sym("passwd", "/etc/passwd"), reg("f", b"data")]),
                 {"etc": "/etc", "passwd": "/etc/passwd"}),
    "chain": (_gz([dir_("a/b/"), sym("a/b/up", "../.."), sym("x", "a/b/up/../" + SENTINEL),
                   reg("y", b"data")]),
              {"a/b/up": "../..", "x": "a/b/up/../" + SENTINEL}),
    "reserved_names": (  # the publisher's own names: the user's are dropped, ours written
        _gz([sym(".publisher", "../" + SENTINEL + "/secret"), sym(".cvmfscatalog", "/etc/passwd"),
             reg(".publisher/inside", b"dropped"), reg("sub/.publisher", b"kept"),
             reg("f", b"data")]),
        {}),
}

KEPT_CASES: dict[str, Callable[[Path], Path]] = {
    name: _writer(name + ".tar.gz", make) for name, (make, _) in _KEPT.items()
}
KEPT_SYMLINKS: dict[str, dict[str, str]] = {name: links for name, (_, links) in _KEPT.items()}
