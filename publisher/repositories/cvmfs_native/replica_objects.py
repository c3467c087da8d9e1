"""What a stored catalog or history names, read the way a stratum 1 reads them.

Shared by the pull (:mod:`.replica`: what to fetch) and the replica's garbage collection
(:mod:`.replica_gc`: what to keep), so both agree on what a revision reaches. Stored objects
are inflated to a scratch file in bounded steps and opened read-only; nothing is held in
memory but the rows being read.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from publisher.repositories.cvmfs_native.layout import MANIFEST
from publisher.repositories.cvmfs_native.manifest import LetterError, Manifest, split_letter
from publisher.repositories.cvmfs_native.objects import PARTIAL
from publisher.repositories.cvmfs_native.replica_trust import SHA1_HEX, ReplicaError

_FILE, _DIR, _EXTERNAL = 4, 1, 128
_HASH_BITS = 7 << 8  # hash algorithm - 1 (0: SHA-1)
_INFLATE_STEP = 4 << 20


def read_local_manifest(root: Path) -> tuple[bytes, Manifest] | None:
    """A replica's installed manifest (bytes and fields), or None."""
    try:
        raw = (root / MANIFEST).read_bytes()
        body, _, _ = split_letter(raw)
        return raw, Manifest.parse(body)
    except (FileNotFoundError, LetterError, UnicodeDecodeError):
        return None


def inflate(source: Path, dest: Path) -> None:
    """Inflate a stored object into ``dest`` in bounded steps (ReplicaError if not zlib)."""
    unpacker = zlib.decompressobj()
    try:
        with source.open("rb") as src, dest.open("wb") as out:
            while block := src.read(1 << 20):
                while block:
                    out.write(unpacker.decompress(block, _INFLATE_STEP))
                    block = unpacker.unconsumed_tail
            out.write(unpacker.flush())
    except zlib.error as err:
        raise ReplicaError(f"object {source.name} does not inflate: {err}") from None
    if not unpacker.eof:
        raise ReplicaError(f"object {source.name}: truncated zlib stream")


@contextmanager
def opened(stored: Path, scratch: Path, what: str) -> Iterator[sqlite3.Connection]:
    """The SQLite database inside a stored object, read-only; ``scratch`` is removed after."""
    try:
        inflate(stored, scratch)
        conn = sqlite3.connect(f"file:{scratch}?mode=ro", uri=True)
        try:
            yield conn
        except sqlite3.DatabaseError as err:
            raise ReplicaError(f"{what} {stored.name} is not a valid database: {err}") from None
        finally:
            conn.close()
    finally:
        scratch.unlink(missing_ok=True)


def references(conn: sqlite3.Connection) -> Iterator[tuple[str, str]]:
    """(hex, suffix) of every object a catalog names: file contents, micro-catalogs, chunks.

    External files (flag 128) are not in the store. Only SHA-1 names are accepted.
    """
    (others,) = conn.execute(f"SELECT count(*) FROM catalog WHERE hash IS NOT NULL "  # noqa: S608
                             f"AND flags & {_HASH_BITS}").fetchone()
    if others:
        raise ReplicaError("a catalog names objects by a hash other than SHA-1 (not replicated)")
    for blob, flags in conn.execute(
            f"SELECT DISTINCT hash, flags FROM catalog WHERE hash IS NOT NULL "  # noqa: S608
            f"AND length(hash) > 0 AND flags & {_EXTERNAL} = 0"):
        suffix = "" if flags & _FILE else "L" if flags & _DIR else None
        if suffix is not None:
            yield _hex(blob), suffix
    for (blob,) in conn.execute(
            f"SELECT DISTINCT chunks.hash FROM chunks JOIN catalog USING "  # noqa: S608
            f"(md5path_1, md5path_2) WHERE catalog.flags & {_EXTERNAL} = 0"):
        yield _hex(blob), PARTIAL


def nested(conn: sqlite3.Connection) -> list[str]:
    """The hashes of the catalogs nested directly below this one."""
    children = [str(h) for (h,) in conn.execute("SELECT sha1 FROM nested_catalogs")]
    for child in children:
        if not SHA1_HEX.fullmatch(child):
            raise ReplicaError(f"a catalog lists a nested catalog {child!r} that is not a SHA-1 "
                               "hash")
    return children


def tagged_roots(conn: sqlite3.Connection) -> list[str]:
    """The root catalogs a history database tags."""
    roots = sorted({str(h) for (h,) in conn.execute("SELECT hash FROM tags")})
    for root in roots:
        if not SHA1_HEX.fullmatch(root):
            raise ReplicaError(f"the history tags a root catalog {root!r} that is not a SHA-1 "
                               "hash")
    return roots


def _hex(blob: object) -> str:
    if not isinstance(blob, bytes) or len(blob) != 20:
        raise ReplicaError("a catalog row has a malformed content hash")
    return blob.hex()
