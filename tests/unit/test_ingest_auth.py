"""Identity from verified chains, the grid-mapfile, and token checks (keys served locally)."""

from __future__ import annotations

import os
import ssl
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from devsite.pki import CertificateAuthority, Credential, TokenIssuer, forged_proxy, make_proxy
from ingest.auth import (
    ANY_AUDIENCE,
    Authenticator,
    AuthError,
    GridMap,
    TokenVerifier,
    identity_from_chain,
    parse_gridmap,
    slash_dn,
)

USER_DN = "/DC=org/DC=example/OU=People/CN=Jane Doe 12345"


@pytest.fixture(scope="module")
def pki():
    ca = CertificateAuthority(key_type="ec")
    user = ca.issue_user(USER_DN, key_type="ec")
    return ca, user


def chain_of(cred: Credential):
    return [cred.cert, *cred.chain]


def environ_of(cred: Credential | None, **extra):
    env = {"REMOTE_ADDR": "192.0.2.7", **extra}
    if cred is not None:
        for n, cert in enumerate(chain_of(cred)):
            env[f"SSL_CLIENT_CERT_CHAIN_{n}"] = cert.public_bytes(Encoding.PEM).decode()
    return env


# -- chains -------------------------------------------------------------------------------------


def test_identity_is_the_end_entity_of_any_proxy_depth(pki):
    _, user = pki
    proxy = make_proxy(user, key_type="ec")
    assert identity_from_chain(chain_of(user), False) == USER_DN
    assert identity_from_chain(chain_of(proxy), False) == USER_DN
    assert identity_from_chain(chain_of(make_proxy(proxy, key_type="ec")), False) == USER_DN


def test_a_user_dn_ending_in_a_numeric_cn_is_kept_whole():
    # The original's leaf-stripping would cut "/CN=123456" off this DN; the chain walk does not.
    ca = CertificateAuthority(key_type="ec")
    dn = "/DC=ch/DC=cern/OU=Users/CN=jdoe/CN=123456"
    user = ca.issue_user(dn, key_type="ec")
    assert identity_from_chain(chain_of(make_proxy(user, key_type="ec")), False) == dn


def test_limited_proxies_follow_the_configuration(pki):
    _, user = pki
    limited = make_proxy(user, limited=True, key_type="ec")
    below_limited = make_proxy(limited, key_type="ec")
    for cred in (limited, below_limited):
        with pytest.raises(AuthError) as err:
            identity_from_chain(chain_of(cred), allow_limited=False)
        assert err.value.reason == "limited_proxy" and err.value.subject == USER_DN
        assert identity_from_chain(chain_of(cred), allow_limited=True) == USER_DN


def test_forged_or_broken_chains_are_refused(pki):
    _, user = pki
    forged = forged_proxy(user)
    proxy = make_proxy(user, key_type="ec")
    for chain in (chain_of(forged), [proxy.cert], [proxy.cert, proxy.cert]):
        with pytest.raises(AuthError) as err:
            identity_from_chain(chain, False)
        assert err.value.reason == "bad_proxy"


def test_slash_dn_uses_openssl_short_names():
    ca = CertificateAuthority("/C=US/O=Fermi Research Alliance/emailAddress=a@b.org/CN=x",
                              key_type="ec")
    assert slash_dn(ca.cert.subject) == "/C=US/O=Fermi Research Alliance/emailAddress=a@b.org/CN=x"


# -- grid-mapfile -------------------------------------------------------------------------------


def test_gridmap_parsing():
    text = "\n".join([
        "# comment",
        '"/DC=org/DC=example/CN=Jane Doe" janedoe',
        '  "/DC=org/CN=Quote \\"Q\\" Person"   qp,other ',
        "/DC=org/CN=NoSpaces plain",
        '"/DC=de/CN=J\\xC3\\xBCrgen M\\xC3\\xBCller" juergen',
        '"/DC=de/CN=Jürgen Utf8" utf8',
        "garbage line",
        '"/DC=org/DC=example/CN=Jane Doe" second-entry-ignored',
    ])
    assert parse_gridmap(text) == {
        "/DC=org/DC=example/CN=Jane Doe": "janedoe",
        '/DC=org/CN=Quote "Q" Person': "qp",
        "/DC=org/CN=NoSpaces": "plain",
        "/DC=de/CN=Jürgen Müller": "juergen",
        "/DC=de/CN=Jürgen Utf8": "utf8",
    }


def test_gridmap_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "grid-mapfile"
    path.write_text('"/CN=A" a\n')
    gridmap = GridMap(path)
    assert gridmap.lookup("/CN=A") == "a" and gridmap.lookup("/CN=B") is None
    # Same size and same mtime, new inode (an atomic replace): still noticed.
    stat = path.stat()
    new = tmp_path / "new"
    new.write_text('"/CN=B" b\n')
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(new, path)
    assert gridmap.lookup("/CN=B") == "b" and gridmap.lookup("/CN=A") is None
    # Rewritten in place with another size.
    path.write_text('"/CN=B" b\n"/CN=C" c\n')
    assert gridmap.lookup("/CN=C") == "c"
    # Gone: the last good version stays in force.
    path.unlink()
    assert gridmap.lookup("/CN=C") == "c"


def test_authenticator_order_and_messages(tmp_path, pki):
    _, user = pki
    path = tmp_path / "grid-mapfile"
    path.write_text(f'"{USER_DN}" janedoe\n')
    auth = Authenticator(GridMap(path), None)
    identity = auth.authenticate(environ_of(make_proxy(user, key_type="ec")))
    assert (identity.name, identity.account, identity.method) == (USER_DN, "janedoe", "x509")
    assert identity.submitter == f"janedoe ({USER_DN})"
    cases = [
        (environ_of(None), "no_credentials", "Token or client cert required"),
        (environ_of(None, REMOTE_ADDR="127.0.0.1"), "no_credentials", "Token or client cert required"),
        (environ_of(user, HTTP_AUTHORIZATION="Basic abc"), "bad_token",
         "Unrecognized authorization scheme"),
        (environ_of(user, HTTP_AUTHORIZATION="Bearer"), "bad_token",
         "Failure to parse Authorization"),
        (environ_of(None, HTTP_AUTHORIZATION="Bearer x.y.z"), "untrusted_issuer",
         "Untrusted token issuer"),
    ]
    stranger = CertificateAuthority(key_type="ec").issue_user("/DC=org/CN=Stranger", key_type="ec")
    cases.append((environ_of(stranger), "unknown_dn", "Unrecognized DN"))
    for env, reason, message in cases:
        with pytest.raises(AuthError) as err:
            auth.authenticate(env)
        assert (err.value.reason, err.value.message) == (reason, message)
    trusting = Authenticator(GridMap(path), None, localhost_trusted=True)
    assert trusting.authenticate(environ_of(None, REMOTE_ADDR="127.0.0.1")).name == "localhost"
    assert trusting.authenticate(environ_of(None, REMOTE_ADDR="::1")).method == "localhost"
    with pytest.raises(AuthError):
        trusting.authenticate(environ_of(None, REMOTE_ADDR="192.0.2.1"))


# -- tokens (keys handed over by an in-memory fetch; the HTTPS path is an integration test) --


class Issuers:
    """Discovery and JWKS documents of some issuers, and a record of every fetch."""

    def __init__(self, *issuers: TokenIssuer) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.fetched: list[str] = []

    def fetch(self, url: str, context: ssl.SSLContext) -> dict:
        self.fetched.append(url)
        for base, issuer in self.issuers.items():
            if url == f"{base}/.well-known/openid-configuration":
                return issuer.discovery(f"{base}/jwks")
            if url == f"{base}/jwks":
                return issuer.jwks()
        raise OSError(f"404 {url}")


AUD = "https://pub1.example.org"


@pytest.fixture
def issuers():
    return Issuers(TokenIssuer("https://good.example/a"), TokenIssuer("https://evil.example/b"))


def verifier(issuers, **kw):
    return TokenVerifier(["https://good.example/a"], [AUD], fetch=issuers.fetch, **kw)


def test_valid_tokens_any_audience_form(issuers):
    good = issuers.issuers["https://good.example/a"]
    v = verifier(issuers)
    for aud in (AUD, ANY_AUDIENCE, ["other", AUD]):
        identity = v.verify(good.token(audience=aud))
        assert identity.name == "jane@https://good.example/a" and identity.method == "token"
    assert issuers.fetched == ["https://good.example/a/.well-known/openid-configuration",
                               "https://good.example/a/jwks"]  # cached after the first


def test_unlisted_issuer_is_refused_before_any_fetch(issuers):
    evil = issuers.issuers["https://evil.example/b"]
    with pytest.raises(AuthError) as err:
        verifier(issuers).verify(evil.token(audience=AUD))
    assert err.value.reason == "untrusted_issuer"
    assert issuers.fetched == []


@pytest.mark.parametrize(("claims", "reason"), [
    ({"aud": "https://elsewhere.example"}, "wrong_audience"),
    ({"aud": None}, "wrong_audience"),
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"nbf": int(time.time()) + 3600}, "bad_token"),
    ({"scope": "storage.read:/ compute.read"}, "missing_scope"),
    ({"scope": None}, "missing_scope"),
    ({"sub": None}, "bad_token"),
])
def test_bad_claims(issuers, claims, reason):
    good = issuers.issuers["https://good.example/a"]
    with pytest.raises(AuthError) as err:
        verifier(issuers).verify(good.token(claims, audience=AUD))
    assert err.value.reason == reason, err.value.message


def test_bad_signature_and_garbage(issuers):
    good = issuers.issuers["https://good.example/a"]
    v = verifier(issuers)
    forged = good.token(audience=AUD, key=ec.generate_private_key(ec.SECP256R1()))
    for token, message in ((forged, "Error decoding token: bad signature"),
                           ("not-a-jwt", "Error decoding token: not a JWT")):
        with pytest.raises(AuthError) as err:
            v.verify(token)
        assert (err.value.reason, err.value.message) == ("bad_token", message)


def test_unknown_kid_refreshes_the_keys_but_not_too_often(issuers):
    good = issuers.issuers["https://good.example/a"]
    v = verifier(issuers, min_refresh=0.0)
    v.verify(good.token(audience=AUD))
    rotated = TokenIssuer(good.issuer)  # the issuer rotated its key
    issuers.issuers[good.issuer] = rotated
    assert v.verify(rotated.token(audience=AUD)).account == "jane"
    assert len(issuers.fetched) == 4
    slow = verifier(issuers, min_refresh=3600.0)
    slow.verify(rotated.token(audience=AUD))
    with pytest.raises(AuthError, match="unknown signing key"):
        slow.verify(rotated.token(audience=AUD, headers={"kid": "no-such-kid"}))
    assert len(issuers.fetched) == 6  # no third fetch for the unknown kid


def test_issuer_unreachable_is_a_403_not_a_crash():
    def fetch(url, context):
        raise OSError("connection refused")

    v = TokenVerifier(["https://down.example"], [AUD], fetch=fetch)
    with pytest.raises(AuthError) as err:
        v.verify(TokenIssuer("https://down.example").token(audience=AUD))
    assert err.value.reason == "bad_token"
