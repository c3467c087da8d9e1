"""The two signed text "letters": the manifest ``.cvmfspublished`` (spec §3) and the whitelist
``.cvmfswhitelist`` (spec §5). Parsing only; signatures are checked in :mod:`signature`.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field

from cvmfs_verify.hashes import ROOT_PATH_MD5, ContentHash, HashError

#: Manifest letters of spec §3 (``Z`` is reserved and must not be emitted).
KNOWN_LETTERS = "CBRDSGALNXHTMY"
#: Required by genuine clients (spec §3) plus what verification needs (N, X).
REQUIRED_LETTERS = "CRDSNX"
#: Required by cvmfs-server-scraper (spec §9, §12.3): "emit all of them".
SCRAPER_LETTERS = "ABCDGHMNRSTXY"
_HASH_LETTERS = "CXHMYL"
_INT_LETTERS = "BDST"
_STAMP_RE = re.compile(r"^\d{14}$")
_FINGERPRINT_RE = re.compile(r"^(?:[0-9A-F]{2}:){19}[0-9A-F]{2}(-RMD160|-SHAKE128)?$")


class LetterError(ValueError):
    """A letter that cannot be parsed at all."""


@dataclass(frozen=True)
class SignedLetter:
    """``<body>--\\n<hash>\\n<signature>``: body includes the newline before ``--``."""

    body: bytes
    hash_text: str
    signature: bytes


def split_letter(data: bytes) -> tuple[bytes, SignedLetter | None]:
    """The field lines and, when present, the signature block."""
    if data.startswith(b"--\n"):
        return b"", _block(b"", data[3:])
    index = data.find(b"\n--\n")
    if index < 0:
        if data.endswith(b"\n--"):
            return data[:-2], None
        return data, None
    body = data[:index + 1]
    return body, _block(body, data[index + 4:])


def _block(body: bytes, rest: bytes) -> SignedLetter:
    hash_line, newline, signature = rest.partition(b"\n")
    if not newline:
        signature = b""
    try:
        hash_text = hash_line.decode("ascii")
    except UnicodeDecodeError:
        raise LetterError("the hash line after '--' is not ASCII") from None
    return SignedLetter(body, hash_text, signature)


@dataclass(frozen=True)
class Manifest:
    """The fields of ``.cvmfspublished`` and the problems found while parsing them."""

    fields: dict[str, str]
    letter: SignedLetter | None
    problems: list[str] = field(default_factory=list)

    def hash(self, letter: str) -> ContentHash | None:
        """A hash field (C X H M Y L), or None when absent or malformed."""
        try:
            return ContentHash.parse(self.fields[letter])
        except (KeyError, HashError):
            return None

    def number(self, letter: str) -> int | None:
        """An integer field (B D S T), or None when absent or malformed."""
        try:
            return int(self.fields[letter])
        except (KeyError, ValueError):
            return None

    @property
    def name(self) -> str | None:
        """The repository name ``N``."""
        return self.fields.get("N")


def parse_manifest(data: bytes) -> Manifest:
    """Parse a manifest; field problems are collected, not raised."""
    body, letter = split_letter(data)
    fields: dict[str, str] = {}
    problems: list[str] = []
    if letter is None:
        problems.append("no signature block ('--' line) at the end")
    for number, raw in enumerate(body.split(b"\n")[:-1] if body.endswith(b"\n")
                                 else body.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"line {number} is not UTF-8")
            continue
        if not line:
            problems.append(f"line {number} is empty")
            continue
        key, value = line[0], line[1:]
        if key not in KNOWN_LETTERS:
            problems.append(f"line {number}: unknown field {key!r} (spec §3 letters: {KNOWN_LETTERS})")
        if key in fields:
            problems.append(f"line {number}: field {key} given twice")
        fields[key] = value
    if body and not body.endswith(b"\n"):
        problems.append("the last field line does not end with a newline")
    for key in REQUIRED_LETTERS:
        if key not in fields:
            problems.append(f"required field {key} missing")
    for key in SCRAPER_LETTERS:
        if key not in fields and key not in REQUIRED_LETTERS:
            problems.append(f"field {key} missing (spec §9: emit all of {SCRAPER_LETTERS})")
    for key in _HASH_LETTERS:
        if key in fields:
            try:
                ContentHash.parse(fields[key])
            except HashError:
                problems.append(f"field {key} is not a content hash: {fields[key]!r}")
    for key in _INT_LETTERS:
        if key in fields and not fields[key].isdigit():
            problems.append(f"field {key} is not a non-negative integer: {fields[key]!r}")
    for key in "SB":
        if fields.get(key, "1").isdigit() and int(fields.get(key, "1")) <= 0:
            problems.append(f"field {key} must be > 0")
    if "R" in fields and fields["R"] != ROOT_PATH_MD5:
        problems.append(f"field R is {fields['R']!r}, must be md5('') = {ROOT_PATH_MD5}")
    for key in "GA":
        if key in fields and fields[key] not in ("yes", "no"):
            problems.append(f"field {key} must be 'yes' or 'no', not {fields[key]!r}")
    return Manifest(fields, letter, problems)


@dataclass(frozen=True)
class Whitelist:
    """The fields of ``.cvmfswhitelist``."""

    expires: float | None
    name: str | None
    fingerprints: tuple[str, ...]
    letter: SignedLetter | None
    pkcs7: bool
    problems: list[str] = field(default_factory=list)


def _utc(stamp: str) -> float:
    return float(calendar.timegm(time.strptime(stamp, "%Y%m%d%H%M%S")))


def parse_whitelist(data: bytes) -> Whitelist:
    """Parse a whitelist; problems are collected, not raised."""
    body, letter = split_letter(data)
    problems: list[str] = []
    if letter is None:
        problems.append("no signature block ('--' line): the whitelist is unsigned")
    try:
        lines = body.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise LetterError("whitelist is not UTF-8 text") from None
    if lines and lines[-1] == "":
        lines.pop()
    expires: float | None = None
    name: str | None = None
    pkcs7 = False
    fingerprints: list[str] = []
    if not lines or not _STAMP_RE.match(lines[0]):
        problems.append("line 1 must be the 14-digit creation time YYYYMMDDHHMMSS")
    if len(lines) < 2 or not lines[1].startswith("E") or not _STAMP_RE.match(lines[1][1:]):
        problems.append("line 2 must be the expiry EYYYYMMDDHHMMSS")
    else:
        try:
            expires = _utc(lines[1][1:])
        except ValueError:
            problems.append(f"line 2: invalid expiry time {lines[1][1:]!r}")
    if len(lines) > 2 and lines[2].startswith("N"):
        name = lines[2][1:]
    for number, line in enumerate(lines[3:], start=4):
        if line in ("Vpkcs7", "Wcachain"):
            pkcs7 = pkcs7 or line == "Vpkcs7"
            continue
        text = re.split(r"[ \t#]", line, maxsplit=1)[0]
        if _FINGERPRINT_RE.match(text):
            fingerprints.append(text)
        elif text:
            problems.append(f"line {number}: not a certificate fingerprint: {text!r}")
    if name is None:
        problems.append("line 3 must be the repository name N<fqrn>")
    if not fingerprints:
        problems.append("no certificate fingerprint listed")
    return Whitelist(expires, name, tuple(fingerprints), letter, pkcs7, problems)
