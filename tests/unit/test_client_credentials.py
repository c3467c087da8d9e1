"""Credential discovery: WLCG bearer-token order, X.509 proxy fallback, explicit choices."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from userpub_client.credentials import (
    CredentialError,
    discover_proxy,
    discover_token,
    find_credentials,
    token_expiry,
)

UID = 4321
NOW = 1_800_000_000.0


def jwt_like(exp: float | None) -> str:
    """An unsigned JWT-shaped token (the client never verifies signatures)."""
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    claims = {"sub": "jane"} if exp is None else {"sub": "jane", "exp": exp}
    return f"{part({'alg': 'ES256'})}.{part(claims)}.c2ln"


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A scratch /tmp and XDG_RUNTIME_DIR, each with a token and the tmp with a proxy."""
    tmp, xdg = tmp_path / "tmp", tmp_path / "run"
    tmp.mkdir()
    xdg.mkdir()
    (tmp / f"bt_u{UID}").write_text("tmp-token\n")
    (xdg / f"bt_u{UID}").write_text("  xdg-token \n")
    (tmp / f"x509up_u{UID}").write_text("proxy")
    named = tmp_path / "named-token"
    named.write_text("file-token\n")
    proxy = tmp_path / "proxy.pem"
    proxy.write_text("proxy")
    return {"tmp": tmp, "xdg": xdg, "named": named, "proxy": proxy}


@pytest.mark.parametrize(("env_keys", "expected"), [
    (("BEARER_TOKEN", "BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR"), "env-token"),
    (("BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR"), "file-token"),
    (("XDG_RUNTIME_DIR",), "xdg-token"),
    ((), "tmp-token"),
])
def test_token_discovery_order(places, env_keys, expected):
    full = {"BEARER_TOKEN": "env-token", "BEARER_TOKEN_FILE": str(places["named"]),
            "XDG_RUNTIME_DIR": str(places["xdg"])}
    env = {k: full[k] for k in env_keys}
    found = discover_token(env, UID, str(places["tmp"]))
    assert found is not None
    assert found[0] == expected


def test_no_token_anywhere(tmp_path):
    assert discover_token({"XDG_RUNTIME_DIR": str(tmp_path)}, UID, str(tmp_path)) is None


def test_token_file_must_hold_one_token(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("two tokens\n")
    with pytest.raises(CredentialError, match="does not hold one token"):
        discover_token({"BEARER_TOKEN_FILE": str(bad)}, UID, str(tmp_path))


def test_proxy_discovery(places):
    tmp = str(places["tmp"])
    assert discover_proxy({}, UID, tmp) == places["tmp"] / f"x509up_u{UID}"
    assert discover_proxy({"X509_USER_PROXY": str(places["proxy"])}, UID, tmp) == places["proxy"]
    assert discover_proxy({}, UID + 1, tmp) is None
    with pytest.raises(CredentialError, match="no such file"):
        discover_proxy({"X509_USER_PROXY": str(places["tmp"] / "gone")}, UID, tmp)


def test_token_preferred_over_proxy(places):
    env = {"X509_USER_PROXY": str(places["proxy"]), "BEARER_TOKEN": "env-token"}
    creds = find_credentials(env, uid=UID, tmp=str(places["tmp"]), now=NOW)
    assert (creds.token, creds.proxy) == ("env-token", None)
    assert creds.describe() == "bearer token from $BEARER_TOKEN"


def test_expired_token_falls_back_to_proxy(places):
    env = {"BEARER_TOKEN": jwt_like(NOW - 120), "X509_USER_PROXY": str(places["proxy"])}
    creds = find_credentials(env, uid=UID, tmp=str(places["tmp"]), now=NOW)
    assert creds.token is None
    assert creds.proxy == places["proxy"]
    assert any("expired 120 s ago" in note for note in creds.notes)


def test_valid_jwt_is_used(places):
    token = jwt_like(NOW + 600)
    creds = find_credentials({"BEARER_TOKEN": token}, uid=UID, tmp=str(places["tmp"]), now=NOW)
    assert creds.token == token


def test_unreadable_token_file_falls_back_with_a_note(places):
    env = {"BEARER_TOKEN_FILE": str(places["tmp"] / "gone"),
           "X509_USER_PROXY": str(places["proxy"])}
    creds = find_credentials(env, uid=UID, tmp=str(places["tmp"]), now=NOW)
    assert creds.proxy == places["proxy"]
    assert creds.token is None
    assert "does not exist" in creds.notes[0]


def test_explicit_choices_override_discovery(places):
    env = {"BEARER_TOKEN": "env-token", "X509_USER_PROXY": str(places["proxy"])}
    tmp = str(places["tmp"])
    creds = find_credentials(env, proxy=str(places["proxy"]), uid=UID, tmp=tmp)
    assert (creds.proxy, creds.token) == (places["proxy"], None)
    creds = find_credentials(env, token_file=str(places["named"]), uid=UID, tmp=tmp)
    assert (creds.proxy, creds.token) == (None, "file-token")
    creds = find_credentials(env, proxy=str(places["proxy"]), token_file=str(places["named"]),
                             uid=UID, tmp=tmp)
    assert (creds.proxy, creds.token) == (places["proxy"], "file-token")
    with pytest.raises(CredentialError, match="no such file"):
        find_credentials(env, proxy=str(places["tmp"] / "gone"), uid=UID, tmp=tmp)
    with pytest.raises(CredentialError, match="does not exist"):
        find_credentials(env, token_file=str(places["tmp"] / "gone"), uid=UID, tmp=tmp)


def test_nothing_found(tmp_path):
    creds = find_credentials({}, uid=UID, tmp=str(tmp_path))
    assert (creds.proxy, creds.token) == (None, None)
    assert creds.describe() == "no credentials"


@pytest.mark.parametrize(("token", "expected"), [
    (jwt_like(123), 123.0), (jwt_like(None), None), ("opaque", None), ("a.!!!.c", None),
    (f"a.{base64.urlsafe_b64encode(b'[1]').decode()}.c", None),
])
def test_token_expiry(token, expected):
    assert token_expiry(token) == expected
