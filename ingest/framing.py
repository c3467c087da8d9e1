"""Strict HTTP/1.1 message framing for requests (RFC 9112), and the body readers.

A request's body length must be decided one way only, or the request is refused and its
connection closed: a proxy in front of us and this server must never disagree on where a
request ends, or the rest of one body becomes a second, smuggled request.

* Field lines (:func:`read_fields`): ``name ":" OWS value OWS CRLF`` with a token as name.
  Whitespace before the colon, obsolete line folding, bare CR and other control characters
  are refused (400).
* Framing (:func:`decide_framing`): at most one ``Content-Length``, whose value is 1*DIGIT
  (identical duplicates are refused too, which RFC 9110 section 8.6 allows); not together
  with ``Transfer-Encoding``; ``Transfer-Encoding`` only in HTTP/1.1 and only as the single
  coding ``chunked`` (another coding: 501). More than one ``Host`` is refused as well.
* Chunked bodies (:class:`ChunkedReader`): chunk sizes are 1*HEXDIG with optional
  extensions, every line ends in CRLF, chunk data is followed by CRLF, trailers are field
  lines. The reader never holds more than the caller's buffer, however large a chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BodyReader", "ChunkedReader", "Framing", "FramingError", "Source",
           "UnsupportedCodingError", "decide_framing", "fold_fields", "read_fields"]

DRAIN_CHUNK = 1 << 20
MAX_LINE = 4096
MAX_TRAILERS = 64
MAX_LENGTH_DIGITS = 18  # below 2**63; a longer Content-Length is refused
TOO_LARGE = "Request Entity Too Large"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_NAME = re.compile(_TOKEN)
# VCHAR, obs-text, SP and HTAB; no other control character (NUL, CR, LF, DEL, ...)
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]{1,%d}" % MAX_LENGTH_DIGITS)
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_EXT = rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" \
    + _QUOTED + rb"))?)*"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})" + _CHUNK_EXT + rb"\r\n")
# Headers whose repeated lines cheroot joins with ", " (the others keep their last value).
_LIST_HEADERS = frozenset(
    b"accept accept-charset accept-encoding accept-language accept-ranges allow "
    b"cache-control connection content-encoding content-language expect if-match "
    b"if-none-match pragma te trailer transfer-encoding upgrade vary via warning".split())


class FramingError(ValueError):
    """The request's framing is malformed or ambiguous: answer 400 and close."""


class UnsupportedCodingError(ValueError):
    """A transfer coding other than chunked: answer 501 and close."""


def parse_field(line: bytes) -> tuple[bytes, bytes]:
    """(name, value) of one field line (CRLF included); FramingError if malformed."""
    if not line.endswith(b"\r\n"):
        raise FramingError("HTTP requires CRLF terminators")
    if line[:1] in (b" ", b"\t"):
        raise FramingError("obsolete line folding in a header")
    name, colon, value = line[:-2].partition(b":")
    if not colon:
        raise FramingError("header line without a colon")
    if not _NAME.fullmatch(name):
        raise FramingError("invalid header name (whitespace before the colon?)")
    value = value.strip(b" \t")
    if not _VALUE.fullmatch(value):
        raise FramingError("control character in a header value")
    return name, value


def read_fields(readline: Callable[[], bytes]) -> list[tuple[bytes, bytes]]:
    """Field lines up to the empty line, as (name, value) in order received."""
    fields: list[tuple[bytes, bytes]] = []
    while True:
        line = readline()
        if not line:
            raise FramingError("Illegal end of headers.")
        if line == b"\r\n":
            return fields
        fields.append(parse_field(line))


def fold_fields(fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """cheroot's header dict: ``Title-Case`` names, list headers joined with ", "."""
    out: dict[bytes, bytes] = {}
    for name, value in fields:
        key = name.title()
        joined = key in out and name.lower() in _LIST_HEADERS
        out[key] = out[key] + b", " + value if joined else value
    return out


@dataclass(frozen=True)
class Framing:
    """How the body of a request is delimited: a length, or chunked (length None)."""

    length: int | None
    chunked: bool


def decide_framing(fields: list[tuple[bytes, bytes]], http11: bool) -> Framing:
    """The body framing of a request with these fields; FramingError or UnsupportedCoding."""
    lengths = [v for n, v in fields if n.lower() == b"content-length"]
    codings_lines = [v for n, v in fields if n.lower() == b"transfer-encoding"]
    if sum(n.lower() == b"host" for n, _ in fields) > 1:
        raise FramingError("more than one Host header")
    if len(lengths) > 1:
        raise FramingError("more than one Content-Length header")
    if codings_lines and lengths:
        raise FramingError("both Content-Length and Transfer-Encoding")
    if codings_lines:
        if not http11:
            raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(b" \t").lower() for line in codings_lines for c in line.split(b",")]
        codings = [c for c in codings if c]
        if any(c != b"chunked" for c in codings):
            raise UnsupportedCodingError("only the chunked transfer coding is supported")
        if len(codings) != 1:
            raise FramingError("invalid Transfer-Encoding")
        return Framing(None, True)
    if lengths:
        if not _DIGITS.fullmatch(lengths[0]):
            raise FramingError("invalid Content-Length")
        return Framing(int(lengths[0]), False)
    return Framing(0, False)


class Source(Protocol):
    """Where request bodies come from: lines and small reads buffered, bulk data direct."""

    def readline(self, limit: int) -> bytes: ...
    def read(self, size: int) -> bytes: ...
    def readinto(self, view: memoryview) -> int: ...


def fill(read_some: Callable[[memoryview], int], view: memoryview) -> int:
    """Call ``read_some`` until ``view`` is full or it returns 0; the bytes read."""
    got = 0
    while got < len(view):
        n = read_some(view[got:])
        if n == 0:
            break
        got += n
    return got


class BodyReader:
    """A body of known length (Content-Length); b'' once it is read or the peer is gone."""

    def __init__(self, source: Source, length: int) -> None:
        self.source = source
        self.remaining = length

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` as far as the body goes (fewer bytes only at its end or at EOF)."""
        want = min(len(view), self.remaining)
        if want <= 0:
            return 0
        got = fill(self.source.readinto, view[:want])
        self.remaining -= got
        return got

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` is None or negative)."""
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        buffer = bytearray(want)
        return bytes(buffer[:self.readinto(memoryview(buffer))])

    def readline(self, size: int | None = -1) -> bytes:
        """A line of the body (the API never reads bodies by line)."""
        if self.remaining <= 0:
            return b""
        limit = self.remaining if size is None or size < 0 else min(size, self.remaining)
        line = self.source.readline(limit)
        self.remaining -= len(line)
        return line


class ChunkedReader:
    """De-chunks a request body strictly; never holds more than the caller's buffer."""

    def __init__(self, source: Source, maxlen: int) -> None:
        self.source = source
        self.maxlen = maxlen
        self.left = 0  # bytes left in the current chunk
        self.total = 0
        self.done = False

    @property
    def closed(self) -> bool:
        """True once the last chunk (and the trailers) were read."""
        return self.done

    def _line(self) -> bytes:
        line = self.source.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ValueError("truncated chunked body" if len(line) < MAX_LINE
                             else "chunk header line too long")
        return line

    def _next_chunk(self) -> None:
        line = self._line()
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"bad chunk size line {line[:20]!r}")
        size = int(match.group(1), 16)
        if size == 0:
            for _ in range(MAX_TRAILERS):
                line = self._line()
                if line == b"\r\n":
                    self.done = True
                    return
                try:
                    parse_field(line)
                except FramingError as err:
                    raise ValueError(f"bad trailer: {err}") from None
            raise ValueError("too many trailer lines")
        self.left = size

    def _read_some(self, view: memoryview) -> int:
        if self.done:
            return 0
        if self.left == 0:
            self._next_chunk()
            if self.done:
                return 0
        n = self.source.readinto(view[:min(len(view), self.left)])
        if n == 0:
            raise ValueError("truncated chunked body")
        self.left -= n
        self.total += n
        if self.maxlen and self.total > self.maxlen:
            raise OSError(TOO_LARGE)
        if self.left == 0 and self.source.read(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        return n

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with body bytes (fewer only at the end); ValueError/OSError if bad."""
        return fill(self._read_some, view)

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` body bytes (b'' at the end)."""
        if size is None or size < 0:
            parts = []
            while part := self.read(DRAIN_CHUNK):
                parts.append(part)
            return b"".join(parts)
        buffer = bytearray(size)
        return bytes(buffer[:self.readinto(memoryview(buffer))])

    def readline(self, size: int | None = -1) -> bytes:
        """A line of the body (slow; the API never reads bodies by line)."""
        out = bytearray()
        while size is None or size < 0 or len(out) < size:
            byte = self.read(1)
            out += byte
            if not byte or byte == b"\n":
                break
        return bytes(out)
