"""The development PKI: OpenSSL-compatible hashes, real RFC 3820 proxies, tokens."""

from __future__ import annotations

import shutil
import subprocess

import jwt
import pytest
from cryptography import x509

from devsite.pki import (
    POLICY_INHERIT_ALL,
    CertificateAuthority,
    TokenIssuer,
    expired_proxy,
    forged_proxy,
    make_proxy,
    parse_slash_dn,
    subject_hash,
    write_dev_pki,
)
from ingest.auth import POLICY_LIMITED, proxy_policy

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl is not installed (Debian package openssl: "
                                          "make system-deps)")

DNS = [
    "/DC=org/DC=example/CN=Example Test CA",
    "/C=US/O=Fermi  Research Alliance/OU=Fermilab/CN=  Mixed CASE   ca  ",
    "/DC=ch/DC=cern/OU=Organic Units/OU=Users/CN=jdoe/CN=123456/CN=Jane Doe",
    "/emailAddress=Grid.Admin@Example.ORG/CN=a",
    "/C=DE/O=GermanGrid/OU=Uni Köln/CN=Jürgen Müller",
]


@needs_openssl
@pytest.mark.parametrize("dn", DNS)
def test_subject_hash_is_what_openssl_prints(tmp_path, dn):
    ca = CertificateAuthority(dn, key_type="ec")
    path = ca.install(tmp_path)
    out = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(path)],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert ca.hash == out == subject_hash(ca.cert.subject)
    assert path.name == f"{out}.0"


@needs_openssl
def test_crl_lands_next_to_the_ca_and_openssl_verifies_it(tmp_path):
    ca = CertificateAuthority(key_type="ec")
    ca.install(tmp_path)
    user = ca.issue_user(key_type="ec")
    ca.revoke(user.cert)
    crl = ca.write_crl(tmp_path)
    assert crl.name == f"{ca.hash}.r0"
    out = subprocess.run(["openssl", "crl", "-in", str(crl), "-noout", "-text", "-CApath",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    assert "verify OK" in out.stderr + out.stdout
    assert f"{user.cert.serial_number:X}" in out.stdout.replace(":", "").upper()


def test_proxies_extend_their_issuer_and_carry_proxy_cert_info():
    ca = CertificateAuthority(key_type="ec")
    user = ca.issue_user(key_type="ec")
    proxy = make_proxy(user, key_type="ec")
    assert proxy.cert.subject.rdns[:-1] == user.cert.subject.rdns
    assert proxy.cert.issuer == user.cert.subject
    assert proxy.chain == (user.cert,)
    assert proxy_policy(proxy.cert) == POLICY_INHERIT_ALL
    assert proxy_policy(user.cert) is None
    ext = proxy.cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14"))
    assert ext.critical
    second = make_proxy(proxy, key_type="ec")
    assert second.chain == (proxy.cert, user.cert)
    assert second.cert.subject.rdns[:-2] == user.cert.subject.rdns
    assert proxy_policy(make_proxy(user, limited=True, key_type="ec").cert) == POLICY_LIMITED
    assert expired_proxy(user).cert.not_valid_after_utc < proxy.cert.not_valid_before_utc
    forged = forged_proxy(user)
    assert forged.cert.issuer == user.cert.subject
    assert forged.cert.subject.rdns[:-1] != user.cert.subject.rdns


def test_proxy_file_is_private_and_in_grid_order(tmp_path):
    ca = CertificateAuthority(key_type="ec")
    proxy = make_proxy(ca.issue_user(key_type="ec"), key_type="ec")
    path = proxy.write(tmp_path / "x509up")
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert text.index("BEGIN CERTIFICATE") < text.index("PRIVATE KEY") < \
        text.rindex("BEGIN CERTIFICATE")
    assert x509.load_pem_x509_certificates(path.read_bytes())[0] == proxy.cert


def test_slash_dn_round_trip():
    dn = "/DC=org/DC=example/OU=People/CN=Jane Doe 12345"
    ca = CertificateAuthority(key_type="ec")
    assert ca.issue_user(dn, key_type="ec").dn == dn
    with pytest.raises(ValueError, match="not a slash-form"):
        parse_slash_dn("CN=x")
    with pytest.raises(ValueError, match="unsupported"):
        parse_slash_dn("/XX=1")


def test_tokens_verify_against_the_published_jwks():
    issuer = TokenIssuer("https://issuer.example/one")
    token = issuer.token({"sub": "bob", "extra": 1, "wlcg.ver": None}, audience="aud1")
    key = jwt.PyJWKSet.from_dict(issuer.jwks()).keys[0]
    claims = jwt.decode(token, key, algorithms=["ES256"], audience="aud1")
    assert claims["sub"] == "bob" and claims["extra"] == 1 and "wlcg.ver" not in claims
    assert claims["iss"] == "https://issuer.example/one"
    assert claims["scope"] == "compute.create"
    assert jwt.get_unverified_header(token)["kid"] == issuer.kid
    assert issuer.discovery("https://x/jwks") == {"issuer": issuer.issuer,
                                                  "jwks_uri": "https://x/jwks"}


def test_write_dev_pki_gives_a_usable_site(tmp_path):
    dn = "/DC=org/DC=example/CN=Dev User"
    paths = write_dev_pki(tmp_path, dn)
    assert paths.grid_mapfile.read_text() == f'"{dn}" janedoe\n'
    assert len(list(paths.ca_dir.glob("*.0"))) == 1 and len(list(paths.ca_dir.glob("*.r0"))) == 1
    assert paths.user_proxy.stat().st_mode & 0o777 == 0o600
    host = x509.load_pem_x509_certificate(paths.host_cert.read_bytes())
    san = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
