"""Compression detection and decompression off the main thread, as a stream of byte chunks.

A :class:`ChunkSource` yields the decompressed tar stream in chunks of about ``CHUNK`` bytes
(bounded memory: at most ``QUEUE_DEPTH`` chunks are in flight). Decompression runs concurrently
with the caller, so the tar parser and the file writes of the main thread overlap with it:

* gzip:  ``isal.igzip`` (ISA-L, ~2x zlib; drops the GIL) in a thread; stdlib ``gzip`` fallback.
* bzip2: ``lbzip2 -dc`` subprocess (multi-threaded bzip2 decoder); ``bz2`` in a thread fallback.
* xz:    ``lzma`` in a thread.  zstd: ``zstandard`` stream reader in a thread.
* none:  plain reads in the calling thread.

zstandard's reader does not report a truncated final frame; a truncated zstd stream is still
caught by the tar layer (missing data or a missing end-of-archive marker).
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import lzma
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol
from zlib import adler32

CHUNK = 1 << 20
QUEUE_DEPTH = 4
_PIPE_SIZE = 1 << 20
OCTAL = b"01234567"


class UnpackError(Exception):
    """The archive is bad or hostile; ``str(err)`` is one user-facing line."""


class _Stream(Protocol):
    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


class ChunkSource(Protocol):
    """The decompressed stream: ``read()`` returns the next chunk, ``b""`` at the end."""

    def read(self) -> bytes: ...


_OTHER_FORMATS = (
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x04\x22\x4d\x18", "lz4-compressed data"),
    (b"LZIP", "lzip-compressed data"),
    (b"\x1f\x9d", "compress(.Z) data"),
    (b"\x89LZO", "lzop-compressed data"),
    (b"%PDF", "a PDF document"),
)


def tar_checksum_ok(block: bytes) -> bool:
    """True if the 512-byte *block* is a tar header with a valid (unsigned or signed) checksum."""
    field = block[148:156].split(b"\0", 1)[0].strip()
    if not field or field.strip(OCTAL):
        return False
    stored = int(field, 8)
    # Byte sums via Adler-32's low half: exact for up to 256 bytes (255 * 256 < 65521).
    unsigned = (
        (adler32(block[:256]) & 0xFFFF)
        + (adler32(block[256:]) & 0xFFFF)
        - (adler32(block[148:156]) & 0xFFFF)
        + 255
    )
    if stored == unsigned:
        return True
    signed = sum((c ^ 0x80) - 0x80 for c in block) - sum((c ^ 0x80) - 0x80 for c in block[148:156])
    return stored == signed + 256


def detect_compression(head: bytes) -> str:
    """Return "gzip", "bzip2", "xz", "zstd" or "none" from the magic bytes of *head*.

    *head* should be the first 512 bytes or more of the file. "none" is returned only when
    *head* starts with a valid tar header (or a zero block); anything else raises UnpackError
    ("empty file" or "not a tar archive (...)").
    """
    if not head:
        raise UnpackError("empty file")
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh") and len(head) > 3 and 0x31 <= head[3] <= 0x39:
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd") or (
        len(head) >= 4 and 0x50 <= head[0] <= 0x5F and head[1:4] == b"\x2a\x4d\x18"
    ):
        return "zstd"
    if len(head) >= 512 and (head[:512] == bytes(512) or tar_checksum_ok(head[:512])):
        return "none"
    what = next((d for magic, d in _OTHER_FORMATS if head.startswith(magic)), None)
    if what is None:
        what = "too short" if len(head) < 512 else "unrecognised content"
    else:
        what = "looks like " + what
    raise UnpackError(f"not a tar archive ({what})")


def _stream_error(compression: str, exc: BaseException) -> UnpackError:
    if isinstance(exc, EOFError):
        return UnpackError(f"truncated {compression} stream")
    msg = str(exc).strip().splitlines()
    return UnpackError(f"corrupt {compression} stream: {msg[0] if msg else type(exc).__name__}")


class _PlainSource:
    def __init__(self, f: BinaryIO) -> None:
        self._fd = f.fileno()

    def read(self) -> bytes:
        return os.read(self._fd, CHUNK)


class _ThreadSource:
    """Runs ``opener(file).read(CHUNK)`` in a worker thread, handing chunks over a queue."""

    def __init__(self, f: BinaryIO, opener: Callable[[BinaryIO], _Stream], name: str) -> None:
        self._name = name
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(
            target=self._run, args=(f, opener), name=f"unpack-{name}", daemon=True
        )
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def _run(self, f: BinaryIO, opener: Callable[[BinaryIO], _Stream]) -> None:
        try:
            stream = opener(f)
            try:
                while True:
                    data = stream.read(CHUNK)
                    if not self._put(data) or not data:
                        return
            finally:
                stream.close()
        except Exception as exc:  # handed to the reading thread
            self._put(exc)

    def read(self) -> bytes:
        if self._eof:
            return b""
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise UnpackError(f"{self._name} decompressor stopped") from None
        if isinstance(item, BaseException):
            self._eof = True
            raise _stream_error(self._name, item) from item
        if not item:
            self._eof = True
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()


class _ProcessSource:
    """Reads the stdout of a decompressor program (argument list, no shell)."""

    def __init__(self, f: BinaryIO, argv: list[str], name: str) -> None:
        self._name = name
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            argv, stdin=f, stdout=subprocess.PIPE, stderr=self._stderr, close_fds=True
        )
        assert self._proc.stdout is not None
        self._fd = self._proc.stdout.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        self._eof = False

    def read(self) -> bytes:
        if self._eof:
            return b""
        data = os.read(self._fd, CHUNK)
        if not data:
            self._eof = True
            if self._proc.wait() != 0:
                self._stderr.seek(0)
                lines = self._stderr.read(4096).decode("utf-8", "replace").strip().splitlines()
                why = lines[-1] if lines else f"exit status {self._proc.returncode}"
                raise UnpackError(f"corrupt or truncated {self._name} stream: {why}")
        return data

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        self._proc.wait()
        self._stderr.close()


def _open_gzip(f: BinaryIO) -> _Stream:
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a declared dependency
        return gzip.GzipFile(fileobj=f, mode="rb")
    stream: _Stream = igzip.IGzipFile(fileobj=f, mode="rb")  # type: ignore[no-untyped-call]
    return stream


def _open_zstd(f: BinaryIO) -> _Stream:
    import zstandard

    stream: _Stream = zstandard.ZstdDecompressor().stream_reader(
        f, read_size=CHUNK, read_across_frames=True, closefd=False
    )
    return stream


_OPENERS: dict[str, Callable[[BinaryIO], _Stream]] = {
    "gzip": _open_gzip,
    "bzip2": lambda f: bz2.BZ2File(f, "rb"),
    "xz": lambda f: lzma.LZMAFile(f, "rb"),  # noqa: SIM115
    "zstd": _open_zstd,
}


@contextlib.contextmanager
def open_chunks(
    f: BinaryIO, compression: str, *, use_programs: bool = True
) -> Iterator[ChunkSource]:
    """Yield a ChunkSource of the decompressed contents of *f* (positioned at its start).

    With *use_programs*, bzip2 is decoded by ``lbzip2`` when it is installed. The worker
    thread or process is stopped when the context exits, also on errors.
    """
    if compression == "none":
        yield _PlainSource(f)
        return
    if compression not in _OPENERS:
        raise ValueError(f"unknown compression {compression!r}")
    lbzip2 = shutil.which("lbzip2") if use_programs and compression == "bzip2" else None
    source: _ProcessSource | _ThreadSource
    if lbzip2:
        source = _ProcessSource(f, [lbzip2, "-d", "-c"], compression)
    else:
        source = _ThreadSource(f, _OPENERS[compression], compression)
    try:
        yield source
    finally:
        source.close()
