"""Bearer tokens against a local issuer: OpenID discovery and JWKS served over HTTPS.

The issuer's certificate comes from the test CA, trusted through ``SSL_CERT_FILE`` as an
operator would trust a site CA. The server never fetches from an issuer it does not accept.
"""

from __future__ import annotations

import time

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from spool import Spool
from tests.helpers import tar_body
from tests.pki import TestPKI, TokenIssuerServer, ingest_config, running_ingest

AUD = "https://pub1.example.org"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def issuers(pki):
    with TokenIssuerServer(pki) as server:
        server.issuer("good")
        server.issuer("evil")
        yield server


@pytest.fixture
def site(tmp_path, pki, issuers, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    config = ingest_config(tmp_path / "site", pki, http=False,
                           token_issuers=[issuers.issuers["good"].issuer], token_audiences=[AUD])
    with running_ingest(config) as (bound, server):
        yield config, f"https://127.0.0.1:{bound.https[1]}", server


def call(site, pki, token, path="/pubapi/exists?cid=grp/t1", data=None):
    _, base, _ = site
    headers = {"Authorization": f"Bearer {token}"}
    if data is None:
        return requests.get(base + path, headers=headers, verify=str(pki.ca_file), timeout=30)
    return requests.post(base + path, headers=headers, data=data, verify=str(pki.ca_file),
                         timeout=30)


def failures(site, reason):
    return site[2].registry.get_sample_value("userpub_auth_failures_total",
                                             {"reason": reason}) or 0.0


def test_valid_token_publishes(site, pki, issuers):
    good = issuers.issuers["good"]
    assert call(site, pki, good.token(audience=AUD)).text == "MISSING\n"
    r = call(site, pki, good.token(audience="https://wlcg.cern.ch/jwt/v1/any"),
             "/pubapi/publish?cid=grp/t1", data=tar_body(2048))
    assert (r.status_code, r.text) == (200, "OK\n")
    config = site[0]
    entry = Spool(config.server.spool).read_entry(config.server.spool / "incoming" / "grp%2Ft1")
    assert entry.submitter == f"jane (jane@{good.issuer})"
    assert "/good/.well-known/openid-configuration" in issuers.requests
    assert "/good/jwks" in issuers.requests


def test_unlisted_issuer_is_refused_and_never_contacted(site, pki, issuers):
    evil = issuers.issuers["evil"]
    r = call(site, pki, evil.token(audience=AUD))
    assert (r.status_code, r.text) == (403, "Untrusted token issuer\n")
    assert not [p for p in issuers.requests if p.startswith("/evil")]
    assert failures(site, "untrusted_issuer") == 1


@pytest.mark.parametrize(("claims", "audience", "reason", "message"), [
    ({}, "https://other.example.org", "wrong_audience", "Error decoding token: audience not accepted"),
    ({"exp": int(time.time()) - 300, "iat": int(time.time()) - 900}, AUD, "expired",
     "Error decoding token: expired"),
    ({"scope": "storage.read:/ compute.read"}, AUD, "missing_scope",
     "compute.create scope missing from token"),
])
def test_refused_tokens(site, pki, issuers, claims, audience, reason, message):
    r = call(site, pki, issuers.issuers["good"].token(claims, audience=audience))
    assert (r.status_code, r.reason, r.text) == (403, "Access denied", message + "\n")
    assert failures(site, reason) == 1


def test_bad_signature(site, pki, issuers):
    forged = issuers.issuers["good"].token(audience=AUD,
                                           key=ec.generate_private_key(ec.SECP256R1()))
    r = call(site, pki, forged)
    assert (r.status_code, r.text) == (403, "Error decoding token: bad signature\n")
    assert failures(site, "bad_token") == 1


def test_garbage_bearer(site, pki):
    r = call(site, pki, "definitely-not-a-jwt")
    assert (r.status_code, r.text) == (403, "Error decoding token: not a JWT\n")


def test_token_and_certificate_together_token_wins(site, pki, issuers):
    _, base, _ = site
    r = requests.get(base + "/pubapi/exists?cid=a", cert=pki.cert("stranger"),
                     headers={"Authorization": f"Bearer {issuers.issuers['good'].token(audience=AUD)}"},
                     verify=str(pki.ca_file), timeout=30)
    assert r.text == "MISSING\n"
