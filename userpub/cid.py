"""Content IDs (CIDs): the grammar, and their reversible encoding to one spool file name.

A CID names one published tree, ``<repository>/<prefix>/<cid>``; jobsub_lite uses
``<group>/<sha256 of the tarball>``. The rules are those of the original cvmfs-user-pub
(normalised path, no leading ``.``, at most one ``/``, no ``'`` or ``\\``) plus: printable ASCII
only, no ``..`` or empty components, at most 255 characters.
"""

from __future__ import annotations

import string

MAX_CID_LENGTH = 255

# Characters kept as they are in spool names; everything else is percent-encoded.
_NAME_SAFE = frozenset(string.ascii_letters + string.digits + "-_.+=,~")
_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))  # no space, no control, ASCII only
_FORBIDDEN = frozenset("'\\\"`")
IGNORED_SUFFIXES = (".tmp", ".part")
TAR_SUFFIXES = (
    ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar",
    ".tgz", ".tbz2", ".tbz", ".txz", ".tzst",
)


class InvalidCid(ValueError):  # noqa: N818 (the name reads as the answer)
    """A CID that breaks the rules; ``str()`` is a one-line reason for the user."""


def validate_cid(cid: str) -> str:
    """Return ``cid`` if it is valid, else raise :class:`InvalidCid` with the reason.

    A CID is not normalised silently: ``a//b`` or ``a/./b`` are refused rather than
    rewritten, so that one CID has exactly one spelling everywhere.
    """
    if not cid:
        raise InvalidCid("empty cid")
    if len(cid) > MAX_CID_LENGTH:
        raise InvalidCid(f"cid longer than {MAX_CID_LENGTH} characters")
    bad = sorted({c for c in cid if c not in _PRINTABLE or c in _FORBIDDEN})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise InvalidCid(f"cid contains forbidden characters: {shown}")
    if cid.startswith("/"):
        raise InvalidCid("cid must not be an absolute path")
    if cid.startswith("."):
        raise InvalidCid("cid must not start with '.'")
    parts = cid.split("/")
    for part in parts:
        if part == "":
            raise InvalidCid("cid has an empty path component")
        if part in (".", ".."):
            raise InvalidCid("cid must not contain '.' or '..' components")
        if part.startswith("."):
            raise InvalidCid("cid components must not start with '.'")
    if len(parts) > 2:
        raise InvalidCid("cid may contain at most one '/'")
    return cid


def is_valid_cid(cid: str) -> bool:
    """True when :func:`validate_cid` accepts ``cid``."""
    try:
        validate_cid(cid)
    except InvalidCid:
        return False
    return True


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
