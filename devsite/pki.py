"""A development PKI made with ``cryptography``: for tests and ``userpub init``, never production.

It makes a CA in the grid layout (``<dir>/<subject hash>.0``, CRL ``<hash>.r0``), host and
user certificates, RFC 3820 proxies (full, limited, proxies of proxies, expired, forged) and
a bearer-token issuer (ES256 key, JWKS, OpenID discovery document, token minting).
The subject hash is OpenSSL's ``X509_NAME_hash`` (what ``openssl x509 -hash`` prints),
computed here so that no ``openssl`` binary is needed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = ["CertificateAuthority", "Credential", "DevPaths", "TokenIssuer", "expired_proxy",
           "forged_proxy", "make_proxy", "parse_slash_dn", "proxy_cert_info", "subject_hash",
           "write_dev_pki", "write_dev_site"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
POLICY_INHERIT_ALL = "1.3.6.1.5.5.7.21.1"
POLICY_LIMITED = "1.3.6.1.4.1.3536.1.1.1.9"
DEFAULT_CA_DN = "/DC=org/DC=example/CN=Example Test CA"
DEFAULT_USER_DN = "/DC=org/DC=example/OU=People/CN=Jane Doe 12345"

# OpenSSL short names for the slash form (both directions).
_SHORT_NAMES: dict[str, ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME, "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME, "DC": NameOID.DOMAIN_COMPONENT, "UID": NameOID.USER_ID,
    "emailAddress": NameOID.EMAIL_ADDRESS, "serialNumber": NameOID.SERIAL_NUMBER,
}


# -- names ------------------------------------------------------------------------------------


def parse_slash_dn(dn: str) -> x509.Name:
    """``/DC=org/DC=example/CN=Jane Doe`` -> x509.Name (attribute order kept)."""
    if not dn.startswith("/"):
        raise ValueError(f"{dn!r} is not a slash-form DN")
    attrs = []
    for part in dn[1:].split("/"):
        key, sep, value = part.partition("=")
        if not sep or key not in _SHORT_NAMES or not value:
            raise ValueError(f"unsupported DN component {part!r} in {dn!r}")
        attrs.append(x509.RelativeDistinguishedName([x509.NameAttribute(_SHORT_NAMES[key], value)]))
    return x509.Name(attrs)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def der_oid(dotted: str) -> bytes:
    """DER encoding (tag included) of an OBJECT IDENTIFIER."""
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray()
    for arc in [40 * parts[0] + parts[1], *parts[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _canonical_value(value: str) -> bytes:
    """OpenSSL's asn1_string_canon: trim, squeeze whitespace, lowercase ASCII; as UTF8String."""
    return _tlv(0x0C, b" ".join(value.encode().split()).lower())


def subject_hash(name: x509.Name) -> str:
    """OpenSSL ``X509_NAME_hash`` of ``name`` as 8 hex digits (``<hash>.0`` in a CA dir)."""
    canon = b""
    for rdn in name.rdns:
        avas = sorted(_tlv(0x30, der_oid(a.oid.dotted_string) + _canonical_value(str(a.value)))
                      for a in rdn)
        canon += _tlv(0x31, b"".join(avas))
    digest = hashlib.sha1(canon).digest()  # noqa: S324 (the hash OpenSSL defines)
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


# -- certificates -----------------------------------------------------------------------------


def new_key(kind: str = "rsa") -> PrivateKey:
    """A fresh private key: ``rsa`` (2048 bits) or ``ec`` (P-256)."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Credential:
    """A certificate, its key, and the certificates a client sends along (nearest first)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def dn(self) -> str:
        """The subject in OpenSSL slash form."""
        return "".join(f"/{_short(a.oid)}={a.value!r}" if isinstance(a.value, bytes)
                       else f"/{_short(a.oid)}={a.value}"
                       for rdn in self.cert.subject.rdns for a in rdn)

    def pem(self) -> bytes:
        """The grid proxy file layout: certificate, key, then the chain."""
        return _cert_pem(self.cert) + _key_pem(self.key) + b"".join(map(_cert_pem, self.chain))

    def write(self, path: Path) -> Path:
        """Write :meth:`pem` to ``path`` (mode 0600); return ``path``."""
        return _write_private(path, self.pem())

    def write_pair(self, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
        """Write the certificate (plus chain) and the key to separate files."""
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(_cert_pem(self.cert) + b"".join(map(_cert_pem, self.chain)))
        return cert_path, _write_private(key_path, _key_pem(self.key))


def _short(oid: ObjectIdentifier) -> str:
    for short, known in _SHORT_NAMES.items():
        if known == oid:
            return short
    return oid.dotted_string


class CertificateAuthority:
    """A self-signed CA that issues host and user certificates and CRLs."""

    def __init__(self, dn: str = DEFAULT_CA_DN, *, days: int = 30, key_type: str = "rsa") -> None:
        self.key = new_key(key_type)
        name = parse_slash_dn(dn)
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self._revoked: dict[int, dt.datetime] = {}

    @property
    def hash(self) -> str:
        """The OpenSSL subject hash of the CA."""
        return subject_hash(self.cert.subject)

    def pem(self) -> bytes:
        """The CA certificate in PEM."""
        return _cert_pem(self.cert)

    def install(self, ca_dir: Path) -> Path:
        """Write ``<ca_dir>/<hash>.0`` (grid layout); return its path."""
        ca_dir.mkdir(parents=True, exist_ok=True)
        path = ca_dir / f"{self.hash}.0"
        path.write_bytes(self.pem())
        return path

    def revoke(self, cert: x509.Certificate) -> None:
        """Put ``cert`` on the next CRL written by :meth:`write_crl`."""
        self._revoked[cert.serial_number] = _now()

    def write_crl(self, ca_dir: Path, *, days: int = 7) -> Path:
        """Write ``<ca_dir>/<hash>.r0`` listing every revoked certificate; return its path."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=days)))
        for serial, when in self._revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
                .build())
        crl = builder.sign(self.key, hashes.SHA256())
        ca_dir.mkdir(parents=True, exist_ok=True)
        path = ca_dir / f"{self.hash}.r0"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, path)
        return path

    def _issue(self, subject: x509.Name, key: PrivateKey, extensions: Sequence[x509.ExtensionType],
               days: float) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_host(self, names: Iterable[str] = ("localhost", "127.0.0.1"), *, days: float = 30,
                   key_type: str = "rsa") -> Credential:
        """A server certificate whose SAN holds ``names`` (IP addresses as IP entries)."""
        names = list(names)
        san: list[x509.GeneralName] = []
        for n in names:
            try:
                san.append(x509.IPAddress(ip_address(n)))
            except ValueError:
                san.append(x509.DNSName(n))
        key = new_key(key_type)
        subject = x509.Name([*self.cert.subject.rdns[:-1], x509.RelativeDistinguishedName(
            [x509.NameAttribute(NameOID.COMMON_NAME, names[0])])])
        cert = self._issue(subject, key, [
            x509.SubjectAlternativeName(san),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        ], days)
        return Credential(cert, key)

    def issue_user(self, dn: str = DEFAULT_USER_DN, *, days: float = 30,
                   key_type: str = "rsa") -> Credential:
        """A user (end-entity) certificate with the slash-form subject ``dn``."""
        key = new_key(key_type)
        cert = self._issue(parse_slash_dn(dn), key,
                           [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])], days)
        return Credential(cert, key)


def _key_usage(cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=not cert_sign, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def proxy_cert_info(policy: str = POLICY_INHERIT_ALL, path_length: int | None = None) -> bytes:
    """DER of an RFC 3820 ProxyCertInfo: SEQ{[pathLen INTEGER], SEQ{policyLanguage OID}}."""
    body = b""
    if path_length is not None:
        body += _tlv(0x02, path_length.to_bytes(max(1, (path_length.bit_length() + 8) // 8),
                                                 "big"))
    body += _tlv(0x30, der_oid(policy))
    return _tlv(0x30, body)


def make_proxy(issuer: Credential, *, limited: bool = False, hours: float = 12.0,
               not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
               subject: x509.Name | None = None, key_type: str = "rsa") -> Credential:
    """An RFC 3820 impersonation proxy signed by ``issuer`` (a user cert or another proxy).

    ``limited`` uses the Globus limited-proxy policy. ``not_before``/``not_after`` override the
    validity (to make expired proxies); ``subject`` overrides the subject (to make forged ones,
    whose subject does not extend the issuer's).
    """
    key = new_key(key_type)
    serial = secrets.randbelow(2**31 - 1) + 1
    if subject is None:
        subject = x509.Name([*issuer.cert.subject.rdns, x509.RelativeDistinguishedName(
            [x509.NameAttribute(NameOID.COMMON_NAME, str(serial))])])
    now = _now()
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(hours=hours)
    pci = x509.UnrecognizedExtension(
        PROXY_CERT_INFO, proxy_cert_info(POLICY_LIMITED if limited else POLICY_INHERIT_ALL))
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.cert.subject)
        .public_key(key.public_key()).serial_number(serial)
        .not_valid_before(start).not_valid_after(end)
        .add_extension(_key_usage(), critical=True)
        .add_extension(pci, critical=True)
        .sign(issuer.key, hashes.SHA256())
    )
    return Credential(cert, key, (issuer.cert, *issuer.chain))


def expired_proxy(issuer: Credential) -> Credential:
    """A proxy that expired an hour ago."""
    now = _now()
    return make_proxy(issuer, not_before=now - dt.timedelta(hours=13),
                      not_after=now - dt.timedelta(hours=1))


def forged_proxy(issuer: Credential, dn: str = "/DC=org/DC=example/OU=People/CN=Someone Else"
                 ) -> Credential:
    """A proxy signed by ``issuer`` whose subject claims another identity (``dn`` + CN)."""
    name = parse_slash_dn(dn)
    subject = x509.Name([*name.rdns, x509.RelativeDistinguishedName(
        [x509.NameAttribute(NameOID.COMMON_NAME, "4242")])])
    return make_proxy(issuer, subject=subject)


# -- tokens -----------------------------------------------------------------------------------


class TokenIssuer:
    """A WLCG-style token issuer: one ES256 key, its JWKS and its OpenID discovery document."""

    ALGORITHM = "ES256"

    def __init__(self, issuer: str, *, kid: str | None = None) -> None:
        self.issuer = issuer
        self.kid = kid or uuid.uuid4().hex[:12]
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set publishing the public key."""
        jwk: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(),
                                                               as_dict=True)
        jwk.update(kid=self.kid, alg=self.ALGORITHM, use="sig")
        return {"keys": [jwk]}

    def discovery(self, jwks_uri: str) -> dict[str, Any]:
        """The ``/.well-known/openid-configuration`` document."""
        return {"issuer": self.issuer, "jwks_uri": jwks_uri}

    def token(self, claims: Mapping[str, Any] | None = None, *, audience: str | list[str] =
              "https://wlcg.cern.ch/jwt/v1/any", lifetime: float = 600.0,
              key: ec.EllipticCurvePrivateKey | None = None,
              headers: Mapping[str, Any] | None = None) -> str:
        """A signed token; ``claims`` override the defaults (a None value removes a claim).

        ``key`` signs with another key under this issuer's kid (a bad signature).
        """
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer, "sub": "jane", "aud": audience, "scope": "compute.create",
            "iat": now, "nbf": now, "exp": now + int(lifetime), "jti": uuid.uuid4().hex,
            "wlcg.ver": "1.0",
        }
        for name, value in (claims or {}).items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        head = {"kid": self.kid, **(headers or {})}
        return jwt.encode(body, key or self.key, algorithm=self.ALGORITHM, headers=head)


# -- a whole development site -----------------------------------------------------------------


@dataclass(frozen=True)
class DevPaths:
    """Where :func:`write_dev_pki` put things."""

    ca_dir: Path
    ca_file: Path
    host_cert: Path
    host_key: Path
    user_proxy: Path
    grid_mapfile: Path


def write_dev_pki(directory: Path, user_dn: str = DEFAULT_USER_DN, account: str = "janedoe",
                  hostnames: Iterable[str] = ("localhost", "127.0.0.1"), *,
                  days: int = 30, proxy_hours: float = 12.0) -> DevPaths:
    """A CA (grid layout, with an empty CRL), host certificate, a user proxy, a grid-mapfile."""
    ca = CertificateAuthority(days=days)
    ca_dir = directory / "certificates"
    ca.install(ca_dir)
    ca.write_crl(ca_dir)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.pem())
    host = ca.issue_host(hostnames)
    host_cert, host_key = host.write_pair(directory / "hostcert.pem", directory / "hostkey.pem")
    user = ca.issue_user(user_dn)
    proxy = make_proxy(user, hours=proxy_hours).write(directory / "proxy.pem")
    gridmap = directory / "grid-mapfile"
    gridmap.write_text(f'"{user_dn}" {account}\n')
    return DevPaths(ca_dir, ca_file, host_cert, host_key, proxy, gridmap)


@dataclass(frozen=True)
class DevSite:
    """Everything ``userpub init`` needs to try the service on one host (never production)."""

    pki: DevPaths
    issuer: str
    issuer_jwks: Path
    token_file: Path


def write_dev_site(directory: Path, issuer: str, audience: str, *,
                   hostnames: Iterable[str] = ("localhost", "127.0.0.1"),
                   days: int = 30) -> DevSite:
    """A development PKI plus a token issuer whose keys are pinned (a JWKS file) and a token.

    The CA, the proxy and the token are valid for ``days``, long enough to keep trying things.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = write_dev_pki(directory, hostnames=hostnames, days=days, proxy_hours=24.0 * days)
    tokens = TokenIssuer(issuer)
    jwks = directory / "issuer-jwks.json"
    jwks.write_text(json.dumps(tokens.jwks(), indent=2) + "\n")
    token_file = _write_private(directory / "token", tokens.token(
        {"sub": "janedoe"}, audience=audience, lifetime=86400.0 * days).encode() + b"\n")
    return DevSite(paths, issuer, jwks, token_file)
