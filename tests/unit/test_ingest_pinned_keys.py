"""Pinned token keys: read from a file, never fetched."""

from __future__ import annotations

import json

import pytest

from devsite.pki import TokenIssuer
from ingest.auth import AuthError, TokenVerifier

ISS = "https://localhost/userpub-dev-issuer"


def no_fetch(url, context):
    raise AssertionError(f"fetched {url}")


def test_pinned_issuer_keys_come_from_the_file(tmp_path):
    issuer = TokenIssuer(ISS)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    verifier = TokenVerifier([ISS], ["https://pub1"], fetch=no_fetch, pinned={ISS: jwks})
    identity = verifier.verify(issuer.token(audience="https://pub1"))
    assert identity.name == f"jane@{ISS}"
    other = TokenIssuer(ISS)  # same issuer name, a key nobody pinned
    with pytest.raises(AuthError) as err:
        verifier.verify(other.token(audience="https://pub1"))
    assert err.value.reason == "bad_token"


def test_pinned_key_rotation_is_picked_up_for_an_unknown_kid(tmp_path):
    old, new = TokenIssuer(ISS, kid="old"), TokenIssuer(ISS, kid="new")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(old.jwks()))
    verifier = TokenVerifier([ISS], [], fetch=no_fetch, pinned={ISS: jwks}, min_refresh=0)
    verifier.verify(old.token())
    jwks.write_text(json.dumps(new.jwks()))
    assert verifier.verify(new.token()).name == f"jane@{ISS}"
