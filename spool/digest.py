"""Does a spooled tarball have the hash its CID names? (``<group>/<sha256>`` is a promise.)"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from spool.names import Kind
from userpub_client.cid import cid_digest

if TYPE_CHECKING:
    from spool.queue import Entry

__all__ = ["CidMismatch", "check_payload_digest", "cid_mismatch"]


class CidMismatch(ValueError):  # noqa: N818 (reads as the answer)
    """A CID naming a hash its tarball does not have (someone else's CID); one line."""


def cid_mismatch(algorithm: str, named: str, actual: str) -> str:
    """The one-line reason of a CID whose named hash is not its tarball's."""
    return f"cid names {algorithm} {named} but the tarball's {algorithm} is {actual}"


def check_payload_digest(entry: Entry) -> None:
    """CidMismatch when ``entry``'s CID names a hash its payload has not.

    Uses the digest recorded when the entry was written (ingest, ``userpub drop``), else
    computes it from the payload (a tarball an operator moved in by hand).
    """
    named = cid_digest(entry.cid)
    if named is None or entry.kind is not Kind.PUBLISH:
        return
    algorithm, expected = named
    actual = entry.digests.get(algorithm)
    if actual is None:
        hasher = hashlib.new(algorithm)
        with entry.payload.open("rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        actual = hasher.hexdigest()
    if actual != expected:
        raise CidMismatch(cid_mismatch(algorithm, expected, actual))
