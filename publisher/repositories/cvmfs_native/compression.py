"""Object compression exactly as CernVM-FS makes it (see ``docs/cvmfs-format.md``).

Genuine tools re-compress objects and compare the result with the object's name: a stratum 1
(``cvmfs_swissknife pull``) re-compresses the certificate and meta-info, ``cvmfs_fsck``
re-compresses every object of a client cache. Both use zlib's ``deflateInit`` at
``Z_DEFAULT_COMPRESSION`` (level 6, 32 KiB window, memory level 8, default strategy) on 16 KiB
input pieces; deflate's output does not depend on how the input is split, so one
``zlib.compress`` call makes the same bytes, provided the zlib library is the reference
implementation (1.2.x as bundled with cvmfs, or the system's; zlib-ng and other fast forks
make different bytes). :func:`compressor_problem` checks that once at startup against bytes
made by the genuine tools.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

LEVEL = zlib.Z_DEFAULT_COMPRESSION

#: SHA-1 of :func:`reference_input` as compressed by ``cvmfs_swissknife zpipe`` (cvmfs 2.12.0
#: with its bundled zlib 1.2.8, 16 KiB pieces, the same deflate setup as pull and fsck).
REFERENCE_SHA1 = "463b1ed05f5313a4b4154e158c07502630030928"


def compress(data: bytes | memoryview) -> bytes:
    """One zlib stream of ``data``, byte for byte what CernVM-FS makes of it."""
    return zlib.compress(data, LEVEL)


def decompress(data: bytes) -> bytes:
    """Inflate one zlib stream (zlib.error if it is not one)."""
    return zlib.decompress(data)


def is_canonical(stored: bytes, content: bytes) -> bool:
    """True when ``stored`` is exactly what :func:`compress` makes of ``content``."""
    return compress(content) == stored


def reference_input() -> bytes:
    """About 480 KB exercising deflate: text with repeats, incompressible bytes, zeros."""
    words = [hashlib.sha256(b"%d" % i).hexdigest()[: 2 + i % 11].encode() for i in range(600)]
    picks = hashlib.shake_256(b"cvmfs-userpub reference input").digest(90_000)
    text = b" ".join(words[(picks[i] << 8 | picks[i + 1]) % len(words)]
                     for i in range(0, len(picks), 2))
    noise = hashlib.shake_256(b"noise").digest(40_000)
    return text[:120_000] + noise + bytes(20_000) + text[60_000:] + b"\n"


def compressor_problem(make: Callable[[bytes], bytes] = compress) -> str | None:
    """None if ``make`` compresses like the genuine tools, else a one-line reason."""
    got = hashlib.sha1(make(reference_input())).hexdigest()  # noqa: S324 (a fingerprint)
    if got == REFERENCE_SHA1:
        return None
    return (f"the zlib library here ({zlib.ZLIB_RUNTIME_VERSION}) compresses differently from "
            f"CernVM-FS (reference stream SHA-1 {got}, expected {REFERENCE_SHA1}): stratum 1s "
            "and cvmfs_fsck would reject its objects; use the reference zlib, not zlib-ng")
