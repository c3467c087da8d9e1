"""Keys, manifest and whitelist: layout, signatures checked by openssl, tampering detected."""

from __future__ import annotations

import datetime
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from publisher.repositories.cvmfs_native.keys import KeysError, init_keys, load_keys
from publisher.repositories.cvmfs_native.manifest import (
    LetterError,
    Manifest,
    Whitelist,
    fingerprint,
    sign_manifest,
    sign_whitelist,
    split_letter,
    verify_manifest,
    verify_whitelist,
    whitelist_body,
)
from tests.helpers import run_userpub, write_config
from tests.requirements import tool

FQRN = "repo.example.org"
MANIFEST = Manifest(root_catalog="a" * 40, catalog_size=57344, ttl=240, revision=7, fqrn=FQRN,
                    certificate="b" * 40, history="c" * 40, timestamp=1_700_000_000,
                    metainfo="d" * 40, reflog="e" * 40)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    files = init_keys(directory, FQRN)
    return files, load_keys(files)


def test_key_files_follow_the_cvmfs_layout(keys):
    files, loaded = keys
    names = sorted(p.name for p in files.directory.iterdir())
    assert names == [f"{FQRN}.crt", f"{FQRN}.key", f"{FQRN}.masterkey", f"{FQRN}.pub"]
    assert stat.S_IMODE(files.master_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.repository_key.stat().st_mode) == 0o600
    assert files.master_public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert loaded.master_key is not None and loaded.master_key.key_size == 2048
    out = subprocess.run([tool("openssl"), "x509", "-noout", "-subject", "-fingerprint", "-sha1",
                          "-in", str(files.certificate)], capture_output=True, text=True,
                         check=True).stdout
    assert f"{FQRN} CernVM-FS Release Managers" in out
    assert fingerprint(loaded.certificate_pem) in out
    with pytest.raises(KeysError, match="exist already"):
        init_keys(files.directory, FQRN)


def test_missing_keys_say_how_to_make_them(tmp_path):
    from publisher.repositories.cvmfs_native.keys import KeyFiles

    with pytest.raises(KeysError, match=r"userpub keys init other\.example\.org"):
        load_keys(KeyFiles(tmp_path, "other.example.org"))


def test_manifest_fields_order_and_round_trip(keys):
    _, loaded = keys
    data = sign_manifest(MANIFEST, loaded.repository_key)
    body, _, _ = split_letter(data)
    assert [line[:1] for line in body.decode().splitlines()] == list("CBRDSGANXHTMY")
    assert b"Rd41d8cd98f00b204e9800998ecf8427e\n" in body
    assert verify_manifest(data, loaded.certificate_pem) == MANIFEST
    assert Manifest.parse(body) == MANIFEST


def test_manifest_signature_verified_by_openssl(keys, tmp_path):
    _, loaded = keys
    _, printed, signature = split_letter(sign_manifest(MANIFEST, loaded.repository_key))
    (tmp_path / "hash").write_text(printed)
    (tmp_path / "sig").write_bytes(signature)
    (tmp_path / "pub.pem").write_bytes(loaded.certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out = subprocess.run([tool("openssl"), "dgst", "-sha1", "-verify", str(tmp_path / "pub.pem"),
                          "-signature", str(tmp_path / "sig"), str(tmp_path / "hash")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "Verified OK" in out.stdout


def test_tampered_manifest_is_rejected(keys):
    _, loaded = keys
    data = sign_manifest(MANIFEST, loaded.repository_key)
    with pytest.raises(LetterError, match="hash does not match"):
        verify_manifest(data.replace(b"S7\n", b"S8\n"), loaded.certificate_pem)
    body, printed, signature = split_letter(data)
    forged = body + b"--\n" + printed.encode() + b"\n" + bytes(len(signature))
    with pytest.raises(LetterError, match="signature does not verify"):
        verify_manifest(forged, loaded.certificate_pem)


def test_whitelist_is_raw_signed_by_the_master_key(keys, tmp_path):
    files, loaded = keys
    assert loaded.master_key is not None
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    body = whitelist_body(FQRN, [fingerprint(loaded.certificate_pem)], now,
                          datetime.timedelta(days=30))
    assert body.decode().splitlines()[:3] == ["20260102030405", "E20260201030405", "N" + FQRN]
    data = sign_whitelist(body, loaded.master_key)
    public = loaded.master_key.public_key()
    assert verify_whitelist(data, public) == body
    _, printed, signature = split_letter(data)
    (tmp_path / "sig").write_bytes(signature)
    out = subprocess.run([tool("openssl"), "pkeyutl", "-verifyrecover", "-pubin", "-inkey",
                          str(files.master_public), "-in", str(tmp_path / "sig")],
                         capture_output=True, check=True)
    assert out.stdout == printed.encode()
    parsed = Whitelist.parse(body)
    assert parsed.expires - parsed.created == datetime.timedelta(days=30)
    assert parsed.fingerprints == (fingerprint(loaded.certificate_pem),)
    with pytest.raises(LetterError):
        verify_whitelist(data.replace(b"E2026", b"E2036"), public)


def test_userpub_keys_init(tmp_path):
    config = write_config(tmp_path / "site", repos=2, backend="cvmfs-native")
    out = run_userpub(config, "keys", "init", "repo2.example.org").stdout
    keydir = tmp_path / "site" / "state" / "keys"
    assert str(keydir / "repo2.example.org.masterkey") in out
    assert sorted(p.name for p in keydir.iterdir()) == [
        "repo2.example.org.crt", "repo2.example.org.key", "repo2.example.org.masterkey",
        "repo2.example.org.pub"]
    again = run_userpub(config, "keys", "init", "repo2.example.org", check=False)
    assert again.returncode == 1 and again.stderr.startswith("fatal: keys of repo2.example.org")
    other = write_config(tmp_path / "other", repos=1)
    wrong = run_userpub(other, "keys", "init", "repo1.example.org", check=False)
    assert wrong.returncode == 1 and "uses the local backend" in wrong.stderr
