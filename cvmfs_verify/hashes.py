"""Content hashes, object names and path hashes of the CVMFS storage format (spec §2, §6).

Hashes are written as ``hex`` plus an algorithm id (``""`` SHA-1, ``-rmd160``, ``-shake128``); an
object lives at ``data/<hex[0:2]>/<hex[2:]><id><suffix>``; catalog rows store the raw digest with the
algorithm in bits 8-10 of ``flags``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Protocol

#: Algorithm ids as written after the hex digits (spec §2; enum order is MD5, SHA-1, RMD160, SHAKE128).
ALGORITHMS: tuple[str, ...] = ("sha1", "rmd160", "shake128")
_SUFFIXES = {"sha1": "", "rmd160": "-rmd160", "shake128": "-shake128"}
_HASH_RE = re.compile(r"^([0-9a-f]{40})(-rmd160|-shake128)?$")

#: Object name suffixes (spec §2, ``Digest::MakePath``).
SUFFIX_CATALOG = "C"
SUFFIX_HISTORY = "H"
SUFFIX_CERTIFICATE = "X"
SUFFIX_METAINFO = "M"
SUFFIX_PARTIAL = "P"
SUFFIX_NONE = ""

#: md5("") -- the path hash of the repository root (manifest ``R``, spec §3).
ROOT_PATH_MD5 = "d41d8cd98f00b204e9800998ecf8427e"


class Hasher(Protocol):
    """The part of a hashlib object the verifier uses."""

    def update(self, data: bytes, /) -> None:
        """Feed bytes."""

    def hexdigest(self) -> str:
        """The digest as lowercase hex."""


class HashError(ValueError):
    """A hash string or flag value that the specification does not allow."""


@dataclass(frozen=True)
class ContentHash:
    """A content hash: 40 hex digits and an algorithm."""

    hex: str
    algorithm: str = "sha1"

    @classmethod
    def parse(cls, text: str) -> ContentHash:
        """Parse ``hex[-algo]`` as written in manifests, nested_catalogs, tags and refs."""
        match = _HASH_RE.match(text)
        if match is None:
            raise HashError(f"not a content hash: {text!r}")
        suffix = match.group(2) or ""
        algorithm = next(a for a, s in _SUFFIXES.items() if s == suffix)
        return cls(match.group(1), algorithm)

    @classmethod
    def from_blob(cls, blob: bytes, flags: int) -> ContentHash:
        """The hash of a catalog row: a raw digest BLOB and the algorithm bits of ``flags``."""
        algorithm = algorithm_from_flags(flags)
        if len(blob) != 20:
            raise HashError(f"digest of {len(blob)} bytes, expected 20")
        return cls(blob.hex(), algorithm)

    def __str__(self) -> str:
        return self.hex + _SUFFIXES[self.algorithm]

    def object_path(self, suffix: str) -> str:
        """Where the object lives below the repository URL (``data/ab/cdef...<suffix>``)."""
        text = str(self)
        return f"data/{text[:2]}/{text[2:]}{suffix}"

    def new_hasher(self) -> Hasher:
        """A fresh hasher of this hash's algorithm."""
        return new_hasher(self.algorithm)


def algorithm_from_flags(flags: int) -> str:
    """The content hash algorithm of a catalog row (flags bits 8-10 = algorithm - 1, spec §6)."""
    index = (flags >> 8) & 0x7
    if index >= len(ALGORITHMS):
        raise HashError(f"unknown hash algorithm {index + 1} in flags {flags}")
    return ALGORITHMS[index]


def compression_from_flags(flags: int) -> str:
    """``zlib`` or ``none`` (flags bits 11-13, spec §6)."""
    index = (flags >> 11) & 0x7
    if index == 0:
        return "zlib"
    if index == 1:
        return "none"
    raise HashError(f"unknown compression {index} in flags {flags}")


class _Shake128:
    """SHAKE-128 with a 160-bit output, as CVMFS uses it."""

    def __init__(self) -> None:
        self._inner = hashlib.shake_128()

    def update(self, data: bytes, /) -> None:
        self._inner.update(data)

    def hexdigest(self) -> str:
        return self._inner.hexdigest(20)


def new_hasher(algorithm: str) -> Hasher:
    """A hasher for ``sha1``, ``rmd160`` or ``shake128``."""
    if algorithm == "sha1":
        return hashlib.sha1(usedforsecurity=False)
    if algorithm == "shake128":
        return _Shake128()
    if algorithm == "rmd160":
        try:
            return hashlib.new("ripemd160")
        except ValueError:
            raise HashError("RIPEMD-160 is not available in this Python's OpenSSL") from None
    raise HashError(f"unknown hash algorithm {algorithm!r}")


def digest(data: bytes, algorithm: str) -> ContentHash:
    """The content hash of ``data``."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return ContentHash(hasher.hexdigest(), algorithm)


def md5_pair(path: bytes) -> tuple[int, int]:
    """``(md5path_1, md5path_2)`` of a repository path: MD5 bytes 0-7 and 8-15 as little-endian int64."""
    first, second = struct.unpack("<qq", hashlib.md5(path, usedforsecurity=False).digest())
    return int(first), int(second)


def parent_path(path: bytes) -> bytes:
    """``/a/b`` -> ``/a``; ``/a`` -> ``""``."""
    return path.rpartition(b"/")[0]
