"""Who is calling: X.509 proxy chains mapped through the grid-mapfile, or WLCG bearer tokens.

X.509: the TLS layer (OpenSSL, with proxy certificates allowed) has verified the chain; the
server adapter puts it in the environ as ``SSL_CLIENT_CERT_CHAIN_<n>`` (leaf first). The
identity is the subject of the first certificate that is not an RFC 3820 proxy, in OpenSSL
slash form, and it must be listed in the grid-mapfile (re-read whenever it changes).

Tokens: ``Authorization: Bearer <JWT>``. The unverified ``iss`` is checked against the
allow-list before anything is fetched; keys come from the issuer's OpenID discovery document
and JWKS (cached, refreshed when an unknown ``kid`` shows up); signature, ``exp``, ``nbf``,
``iat``, ``aud`` and the ``compute.create`` scope are checked. The identity is ``sub@iss``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from userpub.config import IngestConfig

__all__ = ["ANY_AUDIENCE", "AuthError", "Authenticator", "GridMap", "Identity", "TokenVerifier",
           "chain_from_environ", "identity_from_chain", "parse_gridmap", "proxy_policy",
           "slash_dn"]

log = logging.getLogger("userpub.ingest.auth")

PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
POLICY_LIMITED = "1.3.6.1.4.1.3536.1.1.1.9"
ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
REQUIRED_SCOPE = "compute.create"
TOKEN_ALGORITHMS = ("RS256", "ES256", "RS384", "RS512", "ES384", "PS256")
CHAIN_PREFIX = "SSL_CLIENT_CERT_CHAIN_"

_SHORT = {
    NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN", NameOID.DOMAIN_COMPONENT: "DC", NameOID.USER_ID: "UID",
    NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "SN", NameOID.GIVEN_NAME: "GN", NameOID.TITLE: "title",
    NameOID.STREET_ADDRESS: "street", NameOID.POSTAL_CODE: "postalCode",
    NameOID.PSEUDONYM: "pseudonym", NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.DN_QUALIFIER: "dnQualifier", NameOID.INITIALS: "initials",
}
_GRIDMAP_LINE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s+(\S+)|^\s*(/\S+)\s+(\S+)')


class AuthError(Exception):
    """Refused: ``reason`` is a short metric label, ``message`` the one-line 403 body.

    ``subject`` is who was refused, when known (a DN, an issuer), for the log.
    """

    def __init__(self, reason: str, message: str, subject: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.subject = subject


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: ``name`` is the DN or ``sub@iss``; ``account`` the local user."""

    name: str
    account: str
    method: str  # "x509", "token" or "localhost"
    groups: tuple[str, ...] = ()  # a token's wlcg.groups

    def is_one_of(self, names: tuple[str, ...]) -> bool:
        """True when ``names`` holds this caller's account, subject or one of its groups."""
        return self.account in names or self.name in names or any(g in names for g in self.groups)

    @property
    def submitter(self) -> str:
        """What the spool records as the submitter."""
        return f"{self.account} ({self.name})" if self.account != self.name else self.name


# -- X.509 ------------------------------------------------------------------------------------


def slash_dn(name: x509.Name) -> str:
    """OpenSSL's ``/``-separated form (``-nameopt compat``) of ``name``."""
    return "".join(
        "/" + "+".join(f"{_SHORT.get(a.oid, a.oid.dotted_string)}={a.value!s}" for a in rdn)
        for rdn in name.rdns)


def _der_item(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, content, next position) of the DER item at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:pos + length], pos + length


def _oid_text(body: bytes) -> str:
    values: list[int] = []
    acc = 0
    for byte in body:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            values.append(acc)
            acc = 0
    first = min(values[0] // 40, 2)
    return ".".join(map(str, [first, values[0] - 40 * first, *values[1:]]))


def proxy_policy(cert: x509.Certificate) -> str | None:
    """The policy-language OID of an RFC 3820 proxy, or None if ``cert`` is not one."""
    try:
        ext = cert.extensions.get_extension_for_oid(PROXY_CERT_INFO)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    try:
        tag, seq, _ = _der_item(raw, 0)
        pos = 0
        while pos < len(seq):
            tag, body, pos = _der_item(seq, pos)
            if tag == 0x30:  # proxyPolicy
                tag, oid, _ = _der_item(body, 0)
                if tag == 0x06:
                    return _oid_text(oid)
    except (IndexError, ValueError):
        pass
    raise AuthError("bad_proxy", "Malformed proxy certificate")


def _extends_issuer(cert: x509.Certificate) -> bool:
    """RFC 3820 3.4: the subject is the issuer plus exactly one CN."""
    subject, issuer = cert.subject.rdns, cert.issuer.rdns
    return (len(subject) == len(issuer) + 1 and subject[:-1] == issuer and len(subject[-1]) == 1
            and next(iter(subject[-1])).oid == NameOID.COMMON_NAME)


def identity_from_chain(chain: Sequence[x509.Certificate], allow_limited: bool) -> str:
    """The slash-form DN of the end entity behind a verified chain (leaf first).

    Every proxy must extend its issuer's subject and be followed by its issuer; a limited
    proxy anywhere in the chain makes the credential limited.
    """
    limited = False
    for n, cert in enumerate(chain):
        policy = proxy_policy(cert)
        if policy is None:
            dn = slash_dn(cert.subject)
            if limited and not allow_limited:
                raise AuthError("limited_proxy", "Limited proxies are not accepted", dn)
            return dn
        limited = limited or policy == POLICY_LIMITED
        if not _extends_issuer(cert) or n + 1 >= len(chain) or chain[n + 1].subject != cert.issuer:
            raise AuthError("bad_proxy", "Invalid proxy certificate chain")
    raise AuthError("bad_proxy", "No end-entity certificate in the chain")


def chain_from_environ(environ: Mapping[str, Any]) -> list[x509.Certificate]:
    """The verified client chain the server adapter stored in the environ (leaf first)."""
    chain = []
    n = 0
    while (pem := environ.get(f"{CHAIN_PREFIX}{n}")) is not None:
        chain.append(x509.load_pem_x509_certificate(pem.encode("ascii")))
        n += 1
    return chain


def _unescape_dn(text: str) -> str:
    """Undo grid-mapfile escapes: ``\\"``, ``\\\\`` and OpenSSL's ``\\xC3\\xA9`` UTF-8 bytes."""
    if "\\" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in ("x", "X") and \
                re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif text[i] == "\\" and i + 1 < len(text):
            out.extend(text[i + 1].encode())
            i += 2
        else:
            out.extend(text[i].encode())
            i += 1
    return out.decode("utf-8", "replace")


def parse_gridmap(text: str) -> dict[str, str]:
    """DN -> first local account, from grid-mapfile text (comments and junk ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _GRIDMAP_LINE.match(line)
        if m:
            dn, accounts = (m.group(1), m.group(2)) if m.group(1) is not None else \
                (m.group(3), m.group(4))
            out.setdefault(_unescape_dn(dn), accounts.split(",")[0])
    return out


class GridMap:
    """The grid-mapfile, re-read when its mtime, size or inode changes (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._map: dict[str, str] = {}

    def load(self) -> int:
        """Read the file now if it changed; return the number of entries. OSError if unreadable."""
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if key != self._key:
                self._map = parse_gridmap(self.path.read_text(encoding="utf-8", errors="replace"))
                self._key = key
                log.info("read %s: %d entries", self.path, len(self._map))
            return len(self._map)

    def lookup(self, dn: str) -> str | None:
        """The account mapped to ``dn`` (None if unlisted); keeps the last good map on errors."""
        try:
            self.load()
        except OSError as err:
            log.warning("cannot read %s (%s); using the last version read", self.path,
                        err.strerror)
        with self._lock:
            return self._map.get(dn)


# -- tokens -----------------------------------------------------------------------------------


def _fetch_json(url: str, context: ssl.SSLContext, timeout: float = 10.0) -> dict[str, Any]:
    if not url.startswith("https://"):
        raise ValueError(f"refusing to fetch {url}: not https")
    req = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310
        data = json.loads(resp.read(1 << 20))
    if not isinstance(data, dict):
        raise ValueError(f"{url}: not a JSON object")
    return data


class _IssuerKeys:
    """The signing keys of one allowed issuer, found by discovery and cached."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.lock = threading.Lock()
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = float("-inf")


class TokenVerifier:
    """Verifies WLCG bearer tokens from an allow-list of issuers."""

    def __init__(self, issuers: Sequence[str], audiences: Sequence[str], *,
                 context_factory: Callable[[], ssl.SSLContext] = ssl.create_default_context,
                 max_age: float = 3600.0, min_refresh: float = 30.0, leeway: float = 30.0,
                 fetch: Callable[[str, ssl.SSLContext], dict[str, Any]] = _fetch_json,
                 pinned: Mapping[str, Path] | None = None) -> None:
        self.issuers = {i.rstrip("/"): _IssuerKeys(i) for i in issuers}
        self.pinned = {i.rstrip("/"): path for i, path in (pinned or {}).items()}
        self.audiences = [*audiences, ANY_AUDIENCE]
        self.context_factory = context_factory
        self.max_age = max_age
        self.min_refresh = min_refresh
        self.leeway = leeway
        self.fetch = fetch

    def _refresh(self, entry: _IssuerKeys) -> None:
        """Discovery then JWKS; replaces the cached keys (call with entry.lock held)."""
        base = entry.issuer.rstrip("/")
        if base in self.pinned:  # keys distributed by the site: read, never fetched
            keyset = jwt.PyJWKSet.from_dict(json.loads(self.pinned[base].read_text()))
        else:
            context = self.context_factory()
            doc = self.fetch(f"{base}/.well-known/openid-configuration", context)
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError(f"{base}: discovery document has no jwks_uri")
            keyset = jwt.PyJWKSet.from_dict(self.fetch(jwks_uri, context))
        entry.keys = {str(k.key_id or ""): k for k in keyset.keys}
        entry.fetched_at = time.monotonic()
        log.info("fetched %d signing keys of %s", len(entry.keys), entry.issuer)

    def _keys(self, entry: _IssuerKeys, kid: str | None) -> list[jwt.PyJWK]:
        with entry.lock:
            age = time.monotonic() - entry.fetched_at
            unknown = kid is not None and kid not in entry.keys
            if age > self.max_age or (unknown and age > self.min_refresh):
                try:
                    self._refresh(entry)
                except Exception as err:  # network, TLS, JSON, JWKS format: all one story
                    log.warning("cannot fetch the keys of %s: %s", entry.issuer, err)
                    if not entry.keys:
                        raise AuthError("bad_token", "Cannot fetch the token issuer's keys"
                                        ) from None
            if kid is not None:
                return [entry.keys[kid]] if kid in entry.keys else []
            return list(entry.keys.values())

    def verify(self, token: str) -> Identity:
        """Check ``token`` completely; AuthError with the reason otherwise."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("bad_token", "Error decoding token: not a JWT") from None
        iss = unverified.get("iss")
        entry = self.issuers.get(iss.rstrip("/")) if isinstance(iss, str) else None
        if entry is None:
            raise AuthError("untrusted_issuer", "Untrusted token issuer", str(iss)[:200])
        alg = header.get("alg")
        if alg not in TOKEN_ALGORITHMS:
            raise AuthError("bad_token", "Error decoding token: signature algorithm not accepted")
        kid = header.get("kid")
        keys = self._keys(entry, kid if isinstance(kid, str) else None)
        if not keys:
            raise AuthError("bad_token", "Error decoding token: unknown signing key")
        claims = self._decode(token, keys, str(iss), str(alg))
        scopes = str(claims.get("scope", "")).split()
        if REQUIRED_SCOPE not in scopes:
            raise AuthError("missing_scope", f"{REQUIRED_SCOPE} scope missing from token")
        sub = str(claims["sub"])
        groups = claims.get("wlcg.groups", [])
        return Identity(f"{sub}@{iss}", sub, "token",
                        tuple(str(g) for g in groups) if isinstance(groups, list) else ())

    def _decode(self, token: str, keys: list[jwt.PyJWK], iss: str, alg: str) -> dict[str, Any]:
        failure: AuthError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[alg], audience=self.audiences, issuer=iss,
                    leeway=self.leeway, options={"require": ["iss", "sub", "exp", "iat", "aud"]})
                return claims
            except jwt.ExpiredSignatureError:
                raise AuthError("expired", "Error decoding token: expired") from None
            except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as err:
                if isinstance(err, jwt.MissingRequiredClaimError) and err.claim != "aud":
                    raise AuthError("bad_token", f"Error decoding token: no {err.claim} claim") from None
                raise AuthError("wrong_audience", "Error decoding token: audience not accepted") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("bad_token", "Error decoding token: not valid yet") from None
            except jwt.InvalidSignatureError:
                failure = AuthError("bad_token", "Error decoding token: bad signature")
            except jwt.PyJWTError as err:
                raise AuthError("bad_token", f"Error decoding token: {err}") from None
        raise failure or AuthError("bad_token", "Error decoding token: bad signature")


# -- both -------------------------------------------------------------------------------------


class Authenticator:
    """Turns a WSGI environ into an :class:`Identity` or raises :class:`AuthError`."""

    def __init__(self, gridmap: GridMap, tokens: TokenVerifier | None, *,
                 allow_limited: bool = False, localhost_trusted: bool = False) -> None:
        self.gridmap = gridmap
        self.tokens = tokens
        self.allow_limited = allow_limited
        self.localhost_trusted = localhost_trusted

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> Authenticator:
        """The authenticator the ``[ingest]`` section describes."""
        tokens = TokenVerifier(cfg.token_issuers, cfg.token_audiences,
                               pinned=dict(cfg.token_keys)) \
            if cfg.token_issuers else None
        return cls(GridMap(cfg.grid_mapfile), tokens, allow_limited=cfg.allow_limited_proxies,
                   localhost_trusted=cfg.localhost_trusted)

    def authenticate(self, environ: Mapping[str, Any]) -> Identity:
        """Bearer token if one is sent, else the client certificate chain."""
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        if header:
            scheme, space, token = header.partition(" ")
            if not space:
                raise AuthError("bad_token", "Failure to parse Authorization")
            if scheme.lower() != "bearer":
                raise AuthError("bad_token", "Unrecognized authorization scheme")
            if self.tokens is None:
                raise AuthError("untrusted_issuer", "Untrusted token issuer")
            return self.tokens.verify(token.strip())
        chain = chain_from_environ(environ)
        if chain:
            dn = identity_from_chain(chain, self.allow_limited)
            account = self.gridmap.lookup(dn)
            if account is None:
                raise AuthError("unknown_dn", "Unrecognized DN", dn)
            return Identity(dn, account, "x509")
        if self.localhost_trusted and _is_loopback(str(environ.get("REMOTE_ADDR", ""))):
            return Identity("localhost", "localhost", "localhost")
        raise AuthError("no_credentials", "Token or client cert required")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
