"""Spool file names: a CID's reversible encoding to one file name, and the names never picked up.

An operator may move a tarball into ``incoming/`` under its percent-encoded CID, optionally
followed by a tar suffix; names starting with ``.`` or ending in ``.tmp``/``.part`` are files
still being written.
"""

from __future__ import annotations

import enum
import string

from userpub_client.cid import InvalidCid, validate_cid

__all__ = [
    "IGNORED_SUFFIXES",
    "TAR_SUFFIXES",
    "Kind",
    "decode_name",
    "encode_name",
    "is_ignored_name",
    "split_tar_suffix",
]

# Characters kept as they are in spool names; everything else is percent-encoded.
_NAME_SAFE = frozenset(string.ascii_letters + string.digits + "-_.+=,~")
IGNORED_SUFFIXES = (".tmp", ".part")
TAR_SUFFIXES = (
    ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar",
    ".tgz", ".tbz2", ".tbz", ".txz", ".tzst",
)


class Kind(enum.StrEnum):
    """What an entry asks for."""

    PUBLISH = "publish"
    STAMP = "stamp"


def encode_name(cid: str) -> str:
    """Encode a valid CID as one file name (percent-encoding; reversible by :func:`decode_name`).

    The result never starts with ``.`` and never ends with an ignored suffix (``.tmp``, ``.part``),
    so the spool never mistakes an entry for a file in progress.
    """
    out = "".join(c if c in _NAME_SAFE else f"%{ord(c):02X}" for c in cid)
    if out.startswith("."):
        out = "%2E" + out[1:]
    if out.endswith(IGNORED_SUFFIXES):
        dot = out.rfind(".")
        out = out[:dot] + "%2E" + out[dot + 1 :]
    return out


def decode_name(name: str) -> str:
    """Decode a spool name made by :func:`encode_name` (or by hand); raise InvalidCid if bad."""
    out: list[str] = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == "%":
            code = name[i + 1 : i + 3]
            if len(code) != 2 or any(h not in string.hexdigits for h in code):
                raise InvalidCid(f"bad percent-encoding in spool name {name!r}")
            out.append(chr(int(code, 16)))
            i += 3
        else:
            out.append(c)
            i += 1
    return validate_cid("".join(out))


def split_tar_suffix(name: str) -> tuple[str, str]:
    """Split an operator's file name into (encoded CID, tar suffix or '')."""
    lower = name.lower()
    for suffix in TAR_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return name, ""


def is_ignored_name(name: str) -> bool:
    """Names the spool never picks up: hidden, or still being written."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)
