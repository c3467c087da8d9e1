"""Content IDs (CIDs): the grammar (the one copy; the server imports it from here).

A CID names one published tree, ``<repository>/<prefix>/<cid>``; jobsub_lite uses
``<group>/<sha256 of the tarball>``. The rules are those of the original cvmfs-user-pub
(normalised path, no leading ``.``, at most one ``/``, no ``'`` or ``\\``) plus: printable ASCII
only, no ``..`` or empty components, at most 255 characters.
"""

from __future__ import annotations

MAX_CID_LENGTH = 255

_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))  # no space, no control, ASCII only
_FORBIDDEN = frozenset("'\\\"`")


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
