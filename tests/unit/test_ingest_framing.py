"""Strict request framing (ingest.framing) on its own: field lines, body length, chunk lines.

The same rules are exercised over real TLS, with smuggled requests behind them, in
tests/integration/test_request_framing.py.
"""

from __future__ import annotations

import io

import pytest

from ingest.framing import (
    ChunkedReader,
    Framing,
    FramingError,
    UnsupportedCodingError,
    decide_framing,
    fold_fields,
    parse_field,
)


@pytest.mark.parametrize(("line", "field"), [
    (b"Host: x\r\n", (b"Host", b"x")),
    (b"Content-Length:   5 \t\r\n", (b"Content-Length", b"5")),  # OWS is not the value
    (b"X-Empty:\r\n", (b"X-Empty", b"")),
    (b"X-Utf8: caf\xc3\xa9\r\n", (b"X-Utf8", b"caf\xc3\xa9")),  # obs-text is allowed
    (b"X-Tab: a\tb\r\n", (b"X-Tab", b"a\tb")),
])
def test_valid_field_lines(line: bytes, field: tuple[bytes, bytes]) -> None:
    assert parse_field(line) == field


@pytest.mark.parametrize("line", [
    b"Host: x\n",  # bare LF
    b" folded\r\n", b"\tfolded\r\n",  # obsolete line folding
    b"Content-Length : 5\r\n", b"Content-Length\t: 5\r\n", b"Content Length: 5\r\n",
    b"no colon\r\n", b": no name\r\n", b"X(y): 1\r\n",
    b"X-A: b\rc\r\n", b"X-A: b\x00c\r\n", b"X-A: b\x7fc\r\n", b"X-A: b\x1bc\r\n",
])
def test_malformed_field_lines(line: bytes) -> None:
    with pytest.raises(FramingError):
        parse_field(line)


def fields(*lines: bytes) -> list[tuple[bytes, bytes]]:
    return [parse_field(line + b"\r\n") for line in lines]


@pytest.mark.parametrize(("given", "http11", "framing"), [
    ([], True, Framing(0, False)),
    ([b"Content-Length: 0"], True, Framing(0, False)),
    ([b"Content-Length: 007"], False, Framing(7, False)),
    ([b"Content-Length: 999999999999999999"], True, Framing(999999999999999999, False)),
    ([b"Transfer-Encoding: chunked"], True, Framing(None, True)),
    ([b"Transfer-Encoding: CHUNKED"], True, Framing(None, True)),
    ([b"Transfer-Encoding: chunked, "], True, Framing(None, True)),  # an empty list element
])
def test_framing_decided(given: list[bytes], http11: bool, framing: Framing) -> None:
    assert decide_framing(fields(*given), http11) == framing


@pytest.mark.parametrize(("given", "http11", "error"), [
    ([b"Content-Length: 5", b"Content-Length: 5"], True, FramingError),
    ([b"Content-Length: 10", b"Content-Length: 5"], True, FramingError),
    ([b"Content-Length: 5, 5"], True, FramingError),
    ([b"Content-Length: +5"], True, FramingError),
    ([b"Content-Length: -5"], True, FramingError),
    ([b"Content-Length: 0x5"], True, FramingError),
    ([b"Content-Length: 0_5"], True, FramingError),
    ([b"Content-Length: 1e3"], True, FramingError),
    ([b"Content-Length: 1000000000000000000"], True, FramingError),  # 19 digits
    ([b"Content-Length:"], True, FramingError),
    ([b"Content-Length: 5", b"Transfer-Encoding: chunked"], True, FramingError),
    ([b"Transfer-Encoding: chunked", b"Content-Length: 5"], True, FramingError),
    ([b"Transfer-Encoding: chunked"], False, FramingError),  # HTTP/1.0
    ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], True, FramingError),
    ([b"Transfer-Encoding: chunked, chunked"], True, FramingError),
    ([b"Transfer-Encoding:"], True, FramingError),
    ([b"Transfer-Encoding: gzip"], True, UnsupportedCodingError),
    ([b"Transfer-Encoding: gzip, chunked"], True, UnsupportedCodingError),
    ([b"Transfer-Encoding: chunked, gzip"], True, UnsupportedCodingError),
    ([b"Transfer-Encoding: chunked;q=1"], True, UnsupportedCodingError),
    ([b"Host: a", b"Host: b"], True, FramingError),
])
def test_ambiguous_framing_refused(given: list[bytes], http11: bool,
                                   error: type[Exception]) -> None:
    with pytest.raises(error):
        decide_framing(fields(*given), http11)


def test_folding_keeps_cheroot_semantics() -> None:
    folded = fold_fields(fields(b"accept: a", b"Accept: b", b"x-one: 1", b"X-One: 2"))
    assert folded == {b"Accept": b"a, b", b"X-One": b"2"}


def dechunk(raw: bytes) -> bytes:
    stream = io.BufferedReader(io.BytesIO(raw))  # type: ignore[arg-type]

    class Source:
        readline = stream.readline
        read = stream.read
        readinto = stream.readinto

    return ChunkedReader(Source(), 0).read()  # type: ignore[arg-type]


@pytest.mark.parametrize("line", [b"5", b"05", b"5;a", b"5;a=b", b'5 ; a = "x;y"', b"5;a;b=c",
                                  b"5\t;a"])
def test_chunk_size_lines_accepted(line: bytes) -> None:
    assert dechunk(line + b"\r\nhello\r\n0\r\n\r\n") == b"hello"


@pytest.mark.parametrize("line", [b"0x5", b"0_5", b"-0", b"+5", b" 5", b"5 ", b"5;", b"5;=b",
                                  b"5;a=", b'5;a="x', b"\xd9\xa5", b"1" * 17, b""])
def test_chunk_size_lines_refused(line: bytes) -> None:
    with pytest.raises(ValueError, match="bad chunk size"):
        dechunk(line + b"\r\nhello\r\n0\r\n\r\n")
