"""Small pieces of ``cvmfs_verify``: hash names, flags, letters, fingerprints, variables."""

from __future__ import annotations

import hashlib
import zlib

import pytest
from cryptography.hazmat.primitives import hashes

from cvmfs_verify.client import expand_variables
from cvmfs_verify.fetch import BadObjectError, DirectorySource, check_object, inflate
from cvmfs_verify.hashes import (
    ContentHash,
    HashError,
    algorithm_from_flags,
    compression_from_flags,
    digest,
    md5_pair,
)
from cvmfs_verify.letters import parse_manifest, parse_whitelist, split_letter
from cvmfs_verify.signature import check_letter_hash, fingerprint
from tests.unit.test_cvmfs_verify_fixture import make_keys

HEX = "0bab73a62aad74f9150bbbc4fa50d91fa718c9cd"


def test_object_paths_of_spec_section_2():
    assert ContentHash.parse(HEX).object_path("C") == f"data/0b/{HEX[2:]}C"
    shake = ContentHash.parse(HEX + "-shake128")
    assert shake.algorithm == "shake128"
    assert shake.object_path("P") == f"data/0b/{HEX[2:]}-shake128P"
    assert str(ContentHash.parse(HEX + "-rmd160")) == HEX + "-rmd160"
    for bad in (HEX[:-1], HEX.upper(), HEX + "-md5", HEX + "C"):
        with pytest.raises(HashError):
            ContentHash.parse(bad)


def test_shake128_is_160_bits():
    assert digest(b"abc", "shake128").hex == hashlib.shake_128(b"abc").hexdigest(20)


def test_flags_bits():
    assert algorithm_from_flags(4) == "sha1"
    assert algorithm_from_flags(4 | (2 << 8)) == "shake128"
    assert compression_from_flags(4) == "zlib"
    assert compression_from_flags(4 | 2048) == "none"
    with pytest.raises(HashError):
        algorithm_from_flags(7 << 8)
    with pytest.raises(HashError):
        compression_from_flags(2 << 11)


def test_md5_path_hashes_are_little_endian_signed():
    assert md5_pair(b"") == (338333539836370388, 9098107892288553193)
    assert md5_pair(b"/sw") == (748981868904704061, -2189496567014796459)


def test_letter_hash_covers_the_newline_before_the_dashes():
    body = b"Cabc\nSx\n"
    letter = split_letter(body + b"--\n" + hashlib.sha1(body).hexdigest().encode() + b"\nSIG")[1]
    assert letter is not None and letter.body == body and letter.signature == b"SIG"
    assert check_letter_hash(letter) is None
    wrong = split_letter(body + b"--\n" + hashlib.sha1(body[:-1]).hexdigest().encode() + b"\n")[1]
    assert wrong is not None and "printed hash" in (check_letter_hash(wrong) or "")


def test_manifest_field_problems():
    body = f"C{HEX}\nRnot-md5\nSzero\nQ1\nGmaybe\n".encode()
    manifest = parse_manifest(body)
    text = "\n".join(manifest.problems)
    for needle in ("no signature block", "required field D missing", "required field N missing",
                   "unknown field 'Q'", "field R is 'not-md5'", "field S is not a non-negative",
                   "field G must be 'yes' or 'no'", "field Y missing"):
        assert needle in text, text
    assert manifest.hash("C") == ContentHash(HEX)
    assert manifest.number("S") is None


def test_whitelist_parsing():
    fp = ":".join(["AB"] * 20)
    data = (f"20240101000000\nE20990101000000\nNrepo.example.org\n{fp} # the repository key\n"
            f"not-a-fingerprint\n--\n").encode() + b"0" * 40 + b"\nsig"
    whitelist = parse_whitelist(data)
    assert whitelist.name == "repo.example.org"
    assert whitelist.fingerprints == (fp,)
    assert whitelist.expires == 4070908800.0
    assert whitelist.problems == ["line 5: not a certificate fingerprint: 'not-a-fingerprint'"]


def test_fingerprint_format_is_openssl_sha1():
    cert = make_keys().cert
    assert fingerprint(cert) == ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA1()))


def test_inflate_rejects_trailing_and_truncated_data():
    packed = zlib.compress(b"hello")
    assert inflate(packed, "x") == b"hello"
    with pytest.raises(BadObjectError, match="after the zlib stream"):
        inflate(packed + b"junk", "x")
    with pytest.raises(BadObjectError, match="truncated"):
        inflate(packed[:-3], "x")


def test_check_object_streams_large_objects(tmp_path):
    raw = bytes(range(256)) * 40000  # 10 MB, inflated in steps
    packed = zlib.compress(raw)
    name = digest(packed, "sha1")
    path = tmp_path / name.object_path("")
    path.parent.mkdir(parents=True)
    path.write_bytes(packed + b"!")
    source = DirectorySource(tmp_path)
    with pytest.raises(BadObjectError, match="content hash is"):
        check_object(source, name, "")
    path.write_bytes(packed)
    info = check_object(source, name, "")
    assert (info.stored_size, info.size) == (len(packed), len(raw))


def test_symlink_variables():
    env = {"ARCH": "x86_64"}
    assert expand_variables(b"lib/$(ARCH)/$(OS:-linux)", env) == b"lib/x86_64/linux"
    assert expand_variables(b"$(MISSING)/x", env) == b"/x"
