"""``userpub ls`` / ``userpub cat``: read a repository the way a CVMFS client does.

Manifest first (and, unless told otherwise, its chain of trust: certificate, signature,
whitelist), then the root catalog, then nested catalogs found by mountpoint prefix, rows looked up
by the MD5 of their path, and file contents fetched by hash (chunk by chunk for chunked files),
each object checked against its name. Symbolic links are followed component by component like the
kernel does, with ``$(VAR)`` / ``$(VAR:-default)`` expanded from the environment (spec §6).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

from cvmfs_verify.catalog import (
    FLAG_CHUNKED,
    FLAG_EXTERNAL,
    Catalog,
    DatabaseError,
    Entry,
)
from cvmfs_verify.fetch import (
    BadObjectError,
    FetchError,
    NotFoundError,
    Source,
    fetch_object,
    read,
)
from cvmfs_verify.hashes import (
    SUFFIX_CATALOG,
    SUFFIX_NONE,
    SUFFIX_PARTIAL,
    ContentHash,
    HashError,
    algorithm_from_flags,
    compression_from_flags,
)
from cvmfs_verify.letters import Manifest, parse_manifest
from cvmfs_verify.trust import MANIFEST, check_chain

MAX_SYMLINKS = 40
_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)(?::-([^)]*))?\)")


class ReadError(Exception):
    """The repository cannot be read, or the path does not lead to what was asked."""


@dataclass(frozen=True)
class Found:
    """A looked-up path: its row and the catalog that holds it."""

    path: bytes
    entry: Entry
    catalog: Catalog


def expand_variables(target: bytes, environ: Mapping[str, str]) -> bytes:
    """Expand ``$(VAR)`` and ``$(VAR:-default)`` in a symlink target as the client does."""
    text = target.decode("utf-8", "surrogateescape")

    def value(match: re.Match[str]) -> str:
        return environ.get(match.group(1), match.group(2) or "")

    return _VARIABLE.sub(value, text).encode("utf-8", "surrogateescape")


class Reader:
    """A read-only client view of one repository revision."""

    def __init__(self, source: Source, manifest: Manifest,
                 environ: Mapping[str, str] | None = None) -> None:
        root = manifest.hash("C")
        if root is None:
            raise ReadError(f"{MANIFEST}: no root catalog hash (C)")
        self.source = source
        self.manifest = manifest
        self.name = manifest.name or ""
        self._root = root
        self._environ = os.environ if environ is None else environ
        self._catalogs: dict[ContentHash, Catalog] = {}

    @classmethod
    def open(cls, source: Source, keys: list[rsa.RSAPublicKey] | None, *, repo: str | None = None,
             now: float | None = None) -> Reader:
        """Read the manifest; with ``keys``, check the chain of trust first (ReadError if broken)."""
        if keys is None:
            try:
                manifest = parse_manifest(read(source, MANIFEST))
            except (NotFoundError, FetchError) as err:
                raise ReadError(f"{MANIFEST}: {err}") from None
            if repo and manifest.name != repo:
                raise ReadError(f"{MANIFEST}: repository is {manifest.name!r}, not {repo!r}")
            return cls(source, manifest)
        problems: list[str] = []
        chain = check_chain(source, keys, repo=repo, now=now,
                            add=lambda where, what: problems.append(f"{where}: {what}"))
        if problems or chain.manifest is None:
            raise ReadError("; ".join(problems) or f"{MANIFEST}: unreadable")
        return cls(source, chain.manifest)

    def close(self) -> None:
        """Release the catalogs loaded so far."""
        for catalog in self._catalogs.values():
            catalog.close()
        self._catalogs.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalogs ----------------------------------------------------------------------------

    def _catalog(self, catalog_hash: ContentHash) -> Catalog:
        if catalog_hash not in self._catalogs:
            try:
                data = fetch_object(self.source, catalog_hash, SUFFIX_CATALOG)
                self._catalogs[catalog_hash] = Catalog(data)
            except NotFoundError:
                raise ReadError(f"catalog {catalog_hash.object_path(SUFFIX_CATALOG)} "
                                "missing") from None
            except (BadObjectError, FetchError, DatabaseError) as err:
                raise ReadError(f"catalog {catalog_hash}: {err}") from None
        return self._catalogs[catalog_hash]

    def catalog_for(self, path: bytes) -> Catalog:
        """The catalog holding ``path``: descend nested catalogs by mountpoint prefix."""
        catalog = self._catalog(self._root)
        while (ref := catalog.nested_for(path)) is not None:
            try:
                catalog = self._catalog(ContentHash.parse(ref.hash))
            except HashError as err:
                raise ReadError(f"nested catalog {ref.path!r}: {err}") from None
        return catalog

    def lookup(self, path: bytes) -> Found | None:
        """The row of a normalized path (no symlink following), or None."""
        catalog = self.catalog_for(path)
        entry = catalog.lookup(path)
        return None if entry is None else Found(path, entry, catalog)

    # -- paths -------------------------------------------------------------------------------

    def _in_repository(self, target: bytes, directory: bytes) -> bytes:
        target = expand_variables(target, self._environ)
        if target.startswith(b"/"):
            mount = f"/cvmfs/{self.name}".encode()
            if target != mount and not target.startswith(mount + b"/"):
                raise ReadError(f"symlink to {target.decode(errors='replace')} leaves "
                                f"the repository")
            return target[len(mount):]
        return directory + b"/" + target

    def resolve(self, path: str | bytes, *, follow: bool = True) -> Found:
        """Look a path up, following symlinks in every component (and the last if ``follow``)."""
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        pending = [c for c in raw.split(b"/") if c]
        current = b""
        hops = 0
        found = self.lookup(b"")
        if found is None:
            raise ReadError("the root catalog has no root directory entry")
        while pending:
            component = pending.pop(0)
            if component == b".":
                continue
            if component == b"..":
                current = current.rpartition(b"/")[0]
                found = self.lookup(current)
                continue
            if not found or not found.entry.is_dir:
                raise ReadError(f"{_show(current)}: not a directory")
            candidate = current + b"/" + component
            found = self.lookup(candidate)
            if found is None:
                raise ReadError(f"{_show(candidate)}: no such file or directory")
            if found.entry.is_link and (pending or follow):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise ReadError(f"{_show(raw)}: too many levels of symbolic links")
                target = self._in_repository(found.entry.symlink or b"", current)
                normalized = posixpath.normpath(b"/" + target.lstrip(b"/"))
                pending = [c for c in normalized.split(b"/") if c] + pending
                current = b""
                found = self.lookup(b"")
                continue
            current = candidate
        assert found is not None
        return found

    def listdir(self, path: str | bytes) -> list[Entry]:
        """The entries of a directory (following symlinks to it), by name."""
        found = self.resolve(path)
        if not found.entry.is_dir:
            raise ReadError(f"{_show(found.path)}: not a directory")
        return self.catalog_for(found.path).listing(found.path)

    def read_file(self, path: str | bytes) -> Iterator[bytes]:
        """The content of a regular file, chunk by chunk, each chunk checked against its hash."""
        found = self.resolve(path)
        entry = found.entry
        if not entry.is_regular:
            raise ReadError(f"{_show(found.path)}: not a regular file")
        if entry.has(FLAG_EXTERNAL):
            raise ReadError(f"{_show(found.path)}: external file, not stored in the repository")
        try:
            compressed = compression_from_flags(entry.flags) == "zlib"
            algorithm = algorithm_from_flags(entry.flags)
            if entry.has(FLAG_CHUNKED):
                pieces = [(ContentHash(c.hash.hex(), algorithm), SUFFIX_PARTIAL, c.size)
                          for c in found.catalog.chunks(entry.md5)]
            else:
                content = entry.content_hash()
                if content is None:
                    raise ReadError(f"{_show(found.path)}: regular file without a content hash")
                pieces = [(content, SUFFIX_NONE, entry.size)]
        except HashError as err:
            raise ReadError(f"{_show(found.path)}: {err}") from None
        return self._pieces(found.path, pieces, compressed, entry.size)

    def _pieces(self, path: bytes, pieces: list[tuple[ContentHash, str, int]], compressed: bool,
                size: int) -> Iterator[bytes]:
        total = 0
        for content, suffix, expected in pieces:
            try:
                data = fetch_object(self.source, content, suffix, compressed=compressed)
            except NotFoundError:
                raise ReadError(f"{_show(path)}: object {content.object_path(suffix)} "
                                "missing") from None
            except (BadObjectError, FetchError) as err:
                raise ReadError(f"{_show(path)}: {err}") from None
            if len(data) != expected:
                raise ReadError(f"{_show(path)}: object {content.object_path(suffix)} has "
                                f"{len(data)} bytes, the catalog says {expected}")
            total += len(data)
            yield data
        if total != size:
            raise ReadError(f"{_show(path)}: read {total} bytes, the catalog says {size}")


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "/"
