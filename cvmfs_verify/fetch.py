"""Reading a stratum 0 the way a client does: from a directory or over HTTP(S), optionally via a proxy.

Objects are checked against their names as they are read (spec §2: the hash is of the bytes as
stored, i.e. compressed unless the entry says otherwise; spec §10: "every downloaded object's hash
must equal its name"). Over HTTP a mismatch is retried once with ``Cache-Control: no-cache``, as a
client does when a proxy may hold a damaged copy.

The verifier also re-compresses what it inflates, as the genuine tools do (``docs/cvmfs-format.md``):
a stratum 1 re-compresses the certificate and meta-info it replicates and ``cvmfs_fsck`` every
object of a client cache, both with zlib's default deflate, and compare the hash with the name.
The result does not depend on how the content is cut into pieces, so it is computed streaming.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cvmfs_verify.hashes import ContentHash, HashError

BLOCK = 1 << 20
INFLATE_STEP = 4 << 20
NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache"}


class NotFoundError(Exception):
    """The file or object does not exist (ENOENT, HTTP 404)."""


class FetchError(Exception):
    """The file or object could not be read for another reason (network, HTTP status, I/O)."""


class BadObjectError(Exception):
    """An object whose content does not match its name, or that does not inflate."""


class Source(Protocol):
    """Where a repository's files come from."""

    location: str

    def stream(self, name: str, *, fresh: bool = False) -> Iterator[bytes]:
        """The bytes of ``name`` (relative to the repository base) in blocks."""

    def object_names(self) -> list[str] | None:
        """Every ``data/xx/...`` file when the store can be listed (a directory), else None."""


def read(source: Source, name: str, *, fresh: bool = False) -> bytes:
    """All bytes of ``name``."""
    return b"".join(source.stream(name, fresh=fresh))


class DirectorySource:
    """A repository directory (the one holding ``.cvmfspublished``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def stream(self, name: str, *, fresh: bool = False) -> Iterator[bytes]:
        """Blocks of a file below the root."""
        path = self.root / name
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFoundError(name) from None
        except OSError as err:
            raise FetchError(f"{name}: {err.strerror}") from None
        with handle:
            while block := handle.read(BLOCK):
                yield block

    def object_names(self) -> list[str] | None:
        """All stored objects (``data/txn`` and dot files excluded)."""
        names: list[str] = []
        data = self.root / "data"
        for sub in sorted(os.listdir(data)) if data.is_dir() else []:
            if len(sub) != 2 or not (data / sub).is_dir():
                continue
            names.extend(f"data/{sub}/{n}" for n in sorted(os.listdir(data / sub))
                         if not n.startswith("."))
        return names


class HttpSource:
    """A repository URL (``http[s]://host[:port]/cvmfs/<fqrn>``), directly or through a proxy."""

    def __init__(self, url: str, proxy: str | None = None, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url}")
        self.location = url.rstrip("/")
        self.timeout = timeout
        # Like a client: only the configured proxy is used, never the environment's.
        proxies = {"http": proxy, "https": proxy} if proxy else {}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def stream(self, name: str, *, fresh: bool = False) -> Iterator[bytes]:
        """Blocks of ``<url>/<name>``."""
        url = f"{self.location}/{name}"  # the scheme is http(s), checked in __init__
        request = urllib.request.Request(url, headers=NO_CACHE if fresh else {})  # noqa: S310
        try:
            response = self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 404:
                raise NotFoundError(name) from None
            raise FetchError(f"{name}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise FetchError(f"{name}: {reason}") from None
        with response:
            try:
                while block := response.read(BLOCK):
                    yield block
            except OSError as err:
                raise FetchError(f"{name}: {err}") from None

    def object_names(self) -> list[str] | None:
        """Not listable over HTTP."""
        return None


def open_source(location: str, *, proxy: str | None = None, repo: str | None = None) -> Source:
    """A source for a URL or a directory (also ``<dir>/<repo>`` when ``<dir>`` is a server root)."""
    if location.startswith(("http://", "https://")):
        return HttpSource(location, proxy)
    root = Path(location)
    if repo and not (root / ".cvmfspublished").exists() and (root / repo).is_dir():
        root = root / repo
    return DirectorySource(root)


@dataclass(frozen=True)
class ObjectInfo:
    """What reading one object established."""

    stored_size: int
    size: int
    recompressed: str | None = None  # hash of zlib's default deflate of the content


@dataclass(frozen=True)
class Fetched:
    """An object's inflated content and the hash of its re-compression."""

    content: bytes
    recompressed: str


def recompression_problem(name: str, expected: ContentHash, recompressed: str | None) -> str | None:
    """The complaint of a stratum 1 / ``cvmfs_fsck`` about an object, or None if it has none."""
    if recompressed is None or recompressed == expected.hex:
        return None
    return (f"{name}: not stored as zlib's default deflate of its content (re-compressed it "
            f"hashes to {recompressed}): a stratum-1 pull and cvmfs_fsck re-compress and reject it")


def _recompressed_hash(content: bytes, expected: ContentHash) -> str:
    hasher = expected.new_hasher()
    hasher.update(zlib.compress(content, zlib.Z_DEFAULT_COMPRESSION))
    return hasher.hexdigest()


def inflate(raw: bytes, name: str) -> bytes:
    """The content of one complete zlib stream; raise BadObjectError otherwise."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw)
    except zlib.error as err:
        raise BadObjectError(f"{name}: not a zlib stream ({err})") from None
    if not inflater.eof:
        raise BadObjectError(f"{name}: truncated zlib stream")
    if inflater.unused_data:
        raise BadObjectError(f"{name}: {len(inflater.unused_data)} bytes after the zlib stream")
    return out


def _attempts(source: Source) -> tuple[bool, ...]:
    return (False, True) if isinstance(source, HttpSource) else (False,)


def _scan(source: Source, expected: ContentHash, name: str, fresh: bool,
          compressed: bool, recompress: bool) -> ObjectInfo:
    hasher = expected.new_hasher()
    inflater = zlib.decompressobj() if compressed else None
    deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION) if compressed and recompress else None
    rehasher = expected.new_hasher()
    stored = size = extra = 0
    inflate_error = ""
    for block in source.stream(name, fresh=fresh):
        hasher.update(block)
        stored += len(block)
        if inflater is None:
            size += len(block)
        elif inflater.eof:
            extra += len(block)
        elif not inflate_error:
            try:
                data = block
                while not inflater.eof:
                    piece = inflater.decompress(data, INFLATE_STEP)
                    size += len(piece)
                    if deflater is not None:
                        rehasher.update(deflater.compress(piece))
                    data = inflater.unconsumed_tail
                    if not data and len(piece) < INFLATE_STEP:  # else output may be pending
                        break
            except zlib.error as err:
                inflate_error = f"not a zlib stream ({err})"
    got = hasher.hexdigest()
    if got != expected.hex:
        raise BadObjectError(f"{name}: content hash is {got}, not the name's {expected.hex}")
    if inflater is not None and not inflate_error:
        extra += len(inflater.unused_data)
        if not inflater.eof:
            inflate_error = "truncated zlib stream"
        elif extra:
            inflate_error = f"{extra} bytes after the zlib stream"
    if inflate_error:
        raise BadObjectError(f"{name}: {inflate_error}")
    if deflater is None:
        return ObjectInfo(stored, size)
    rehasher.update(deflater.flush())
    return ObjectInfo(stored, size, rehasher.hexdigest())


def check_object(source: Source, expected: ContentHash, suffix: str, *,
                 compressed: bool = True, recompress: bool = False) -> ObjectInfo:
    """Stream an object, re-hash it against its name and inflate it; raise NotFoundError/BadObjectError.

    ``recompress``: also deflate the content as the genuine tools do (``ObjectInfo.recompressed``).
    """
    name = expected.object_path(suffix)
    problem = BadObjectError(name)
    for fresh in _attempts(source):
        try:
            return _scan(source, expected, name, fresh, compressed, recompress)
        except HashError as err:
            raise BadObjectError(f"{name}: {err}") from None
        except BadObjectError as err:
            problem = err
    raise problem


def fetch_recompressed(source: Source, expected: ContentHash, suffix: str) -> Fetched:
    """A zlib object's content and the hash of its re-compression (see :func:`check_object`)."""
    content = fetch_object(source, expected, suffix)
    return Fetched(content, _recompressed_hash(content, expected))


def fetch_object(source: Source, expected: ContentHash, suffix: str, *,
                 compressed: bool = True) -> bytes:
    """An object's (inflated) content after checking its hash; raise NotFoundError/BadObjectError."""
    name = expected.object_path(suffix)
    problem = BadObjectError(name)
    for fresh in _attempts(source):
        try:
            raw = read(source, name, fresh=fresh)
            got = expected.new_hasher()
            got.update(raw)
            if got.hexdigest() != expected.hex:
                raise BadObjectError(f"{name}: content hash is {got.hexdigest()}, "
                                f"not the name's {expected.hex}")
            return inflate(raw, name) if compressed else raw
        except HashError as err:
            raise BadObjectError(f"{name}: {err}") from None
        except BadObjectError as err:
            problem = err
    raise problem
