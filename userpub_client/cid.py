"""Content IDs (CIDs): the grammar (the one copy; the server imports it from here).

A CID names one published tree, ``<repository>/<prefix>/<cid>``; jobsub_lite uses
``<group>/<sha256 of the tarball>``, justIN ``<group>/<sha1 of the tarball>``.

:func:`normalize_cid` takes what a client sent and answers as the original cvmfs-user-pub
does: the path is normalised (``a//b`` is ``a/b``, a trailing ``/`` and ``.`` components go),
then refused, in the original's words, when it starts with ``.``, holds ``'`` or ``\\``, or has
more than one ``/``. Our own rules come after, in the same style: no ``..`` (the original's
normalisation silently turned ``a/../b`` into another CID), not absolute, printable ASCII only,
no component starting with ``.`` (those names are the publisher's and CVMFS's own), at most
255 characters. :func:`validate_cid` accepts only the normal form: one CID, one spelling.
"""

from __future__ import annotations

import posixpath
import re

MAX_CID_LENGTH = 255

_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))  # no space, no control, ASCII only
_FORBIDDEN = frozenset("'\\\"`")
#: The hash a CID's last component names, by its length in hex digits (jobsub: sha256,
#: justIN: sha1, both of the tarball as uploaded).
DIGESTS = {40: "sha1", 64: "sha256"}
_HEX = re.compile("[0-9a-fA-F]+")


class InvalidCid(ValueError):  # noqa: N818 (the name reads as the answer)
    """A CID that breaks the rules; ``str()`` is a one-line reason for the user."""


def normalize_cid(raw: str) -> str:
    """The normal form of the CID ``raw``, or :class:`InvalidCid` with the reason.

    The reasons shared with the original are its exact words (``cid may not start with "."``,
    ``disallowed character in cid``, ``at most one slash allowed in cid``).
    """
    if not raw:
        raise InvalidCid("empty cid")
    if ".." in raw.split("/"):
        raise InvalidCid('cid may not contain ".." components')
    cid = posixpath.normpath(raw)
    if cid.startswith("."):
        raise InvalidCid('cid may not start with "."')
    if any(c not in _PRINTABLE or c in _FORBIDDEN for c in cid):
        raise InvalidCid("disallowed character in cid")
    if cid.startswith("/"):
        raise InvalidCid('cid may not start with "/"')
    parts = cid.split("/")
    if len(parts) > 2:
        raise InvalidCid("at most one slash allowed in cid")
    if any(part.startswith(".") for part in parts):
        raise InvalidCid('cid components may not start with "."')
    if len(cid) > MAX_CID_LENGTH:
        raise InvalidCid(f"cid longer than {MAX_CID_LENGTH} characters")
    return cid


def validate_cid(cid: str) -> str:
    """Return ``cid`` if it is a valid CID in normal form, else raise :class:`InvalidCid`."""
    normal = normalize_cid(cid)
    if normal != cid:
        raise InvalidCid(f"cid is not in normal form (it would be {normal})")
    return cid


def cid_digest(cid: str) -> tuple[str, str] | None:
    """(algorithm, lowercase hex) when the CID's last component is a sha1 (40 hex digits) or a
    sha256 (64): the hash the upload must have. None for other CIDs."""
    last = cid.rpartition("/")[2]
    algorithm = DIGESTS.get(len(last))
    if algorithm is None or not _HEX.fullmatch(last):
        return None
    return algorithm, last.lower()


def is_valid_cid(cid: str) -> bool:
    """True when :func:`validate_cid` accepts ``cid``."""
    try:
        validate_cid(cid)
    except InvalidCid:
        return False
    return True
