"""Find the grid user's credentials the way grid tools do: a bearer token, else an X.509 proxy.

Token discovery follows the WLCG Bearer Token Discovery order: ``$BEARER_TOKEN`` (the token
itself), ``$BEARER_TOKEN_FILE``, ``$XDG_RUNTIME_DIR/bt_u<uid>``, ``/tmp/bt_u<uid>``; the first
source that exists is used. The proxy is ``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``.
As in jobsub_lite, a token is preferred when both are found: the server looks at the token
first, and a stale proxy offered in the TLS handshake could make it fail. A token whose
``exp`` has passed is skipped (with a warning) so that a valid proxy can still be used.
Explicit ``--token-file``/``--proxy`` choices override discovery. The servers are trusted
through the system CAs plus a CA bundle and/or a grid CA directory (``$X509_CERT_DIR``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GRID_CA_DIR = "/etc/grid-security/certificates"


class CredentialError(Exception):
    """An explicitly named credential that cannot be used; ``str()`` is the reason."""


@dataclass(frozen=True)
class Credentials:
    """What the client presents: a proxy file for the TLS handshake and/or a bearer token."""

    proxy: Path | None = None
    token: str | None = None
    token_source: str = ""
    notes: tuple[str, ...] = field(default=())
    searched: tuple[str, ...] = field(default=())  # where discovery looked, for the user

    @property
    def missing(self) -> bool:
        """True when there is neither a proxy nor a token."""
        return self.proxy is None and self.token is None

    def why_missing(self) -> str:
        """What to tell a user who has no credentials: where we looked, what to run."""
        where = ", ".join(self.searched) or "the --proxy and --token-file given"
        return (f"no credentials: no bearer token or X.509 proxy found (looked at {where}); "
                "get a token with `htgettoken -a <vault server> -i <issuer>` or a proxy with "
                "`voms-proxy-init -voms <vo>` (or name one with --token-file or --proxy)")

    def describe(self) -> str:
        """One line for the user: which credential is used, from where (never the token)."""
        parts = []
        if self.token is not None:
            parts.append(f"bearer token from {self.token_source}")
        if self.proxy is not None:
            parts.append(f"X.509 proxy {self.proxy}")
        return " and ".join(parts) or "no credentials"


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified: the server does that), or None if unknown."""
    pieces = token.split(".")
    if len(pieces) != 3:
        return None
    payload = pieces[1] + "=" * (-len(pieces[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace removed); CredentialError if unusable."""
    try:
        token = path.read_text(encoding="ascii", errors="strict").strip()
    except FileNotFoundError:
        raise CredentialError(f"token file {path} does not exist") from None
    except (OSError, UnicodeError) as err:
        raise CredentialError(f"cannot read token file {path}: {err}") from None
    if not token or any(c.isspace() for c in token):
        raise CredentialError(f"token file {path} does not hold one token")
    return token


def discover_token(env: Mapping[str, str], uid: int, tmp: str = "/tmp"
                   ) -> tuple[str, str] | None:
    """(token, source) from the WLCG discovery order, or None when there is no token."""
    value = env.get("BEARER_TOKEN", "").strip()
    if value:
        return value, "$BEARER_TOKEN"
    named = env.get("BEARER_TOKEN_FILE", "")
    if named:
        return read_token_file(Path(named)), f"$BEARER_TOKEN_FILE ({named})"
    candidates = []
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(env["XDG_RUNTIME_DIR"]) / f"bt_u{uid}")
    candidates.append(Path(tmp) / f"bt_u{uid}")
    for path in candidates:
        if path.is_file():
            return read_token_file(path), str(path)
    return None


def discover_proxy(env: Mapping[str, str], uid: int, tmp: str = "/tmp") -> Path | None:
    """``$X509_USER_PROXY`` (which must exist when set), else ``/tmp/x509up_u<uid>`` if present."""
    named = env.get("X509_USER_PROXY", "")
    if named:
        path = Path(named)
        if not path.is_file():
            raise CredentialError(f"X509_USER_PROXY={named}: no such file")
        return path
    default = Path(tmp) / f"x509up_u{uid}"
    return default if default.is_file() else None


def find_credentials(env: Mapping[str, str], *, proxy: str | None = None,
                     token_file: str | None = None, uid: int | None = None,
                     now: float | None = None, tmp: str = "/tmp") -> Credentials:
    """The credentials to use: explicit choices first, else discovery (token, then proxy)."""
    uid = os.getuid() if uid is None else uid
    now = time.time() if now is None else now
    if proxy is not None or token_file is not None:
        proxy_path = Path(proxy) if proxy is not None else None
        if proxy_path is not None and not proxy_path.is_file():
            raise CredentialError(f"proxy {proxy}: no such file")
        token = read_token_file(Path(token_file)) if token_file is not None else None
        return Credentials(proxy_path, token, token_file or "")
    notes: list[str] = []
    try:
        found = discover_token(env, uid, tmp)
    except CredentialError as err:
        notes.append(f"ignoring bearer token: {err}")
        found = None
    if found is not None:
        token, source = found
        expiry = token_expiry(token)
        if expiry is None or expiry > now:
            return Credentials(None, token, source, tuple(notes))
        notes.append(f"ignoring the bearer token from {source}: it expired "
                     f"{int(now - expiry)} s ago")
    return Credentials(discover_proxy(env, uid, tmp), None, "", tuple(notes),
                       searched_places(env, uid, tmp))


def searched_places(env: Mapping[str, str], uid: int, tmp: str = "/tmp") -> tuple[str, ...]:
    """Where :func:`find_credentials` looks, in its order, as the user can check them."""
    def variable(name: str) -> str:
        return f"${name}" + ("" if env.get(name) else " (unset)")

    runtime = env.get("XDG_RUNTIME_DIR")
    return (variable("BEARER_TOKEN"), variable("BEARER_TOKEN_FILE"),
            f"{runtime}/bt_u{uid}" if runtime else f"$XDG_RUNTIME_DIR/bt_u{uid} (unset)",
            f"{tmp}/bt_u{uid}", variable("X509_USER_PROXY"), f"{tmp}/x509up_u{uid}")


# -- TLS --------------------------------------------------------------------------------------


def make_ssl_context(credentials: Credentials, *, ca_bundle: str | None = None,
                     ca_dir: str | None = None) -> ssl.SSLContext:
    """Verify servers with the system CAs plus ``ca_bundle``/``ca_dir``; present the proxy."""
    context = ssl.create_default_context()  # honours SSL_CERT_FILE and SSL_CERT_DIR
    try:
        if ca_bundle or ca_dir:
            context.load_verify_locations(cafile=ca_bundle or None, capath=ca_dir or None)
    except (OSError, ssl.SSLError) as err:
        raise CredentialError(f"cannot load CA certificates ({ca_bundle or ca_dir}): {err}") from None
    if credentials.proxy is not None:
        try:
            context.load_cert_chain(str(credentials.proxy))
        except (OSError, ssl.SSLError) as err:
            raise CredentialError(f"cannot use proxy {credentials.proxy}: {err}") from None
    return context


def ca_locations(env: Mapping[str, str], ca_bundle: str | None = None,
                 ca_dir: str | None = None) -> tuple[str | None, str | None]:
    """(CA bundle, CA directory) from the options, ``$USERPUB_CA_BUNDLE`` and ``$X509_CERT_DIR``
    (else ``/etc/grid-security/certificates`` when it exists)."""
    bundle = ca_bundle or env.get("USERPUB_CA_BUNDLE") or None
    directory = ca_dir or env.get("X509_CERT_DIR") or None
    if directory is None and Path(GRID_CA_DIR).is_dir():
        directory = GRID_CA_DIR
    return bundle, directory
