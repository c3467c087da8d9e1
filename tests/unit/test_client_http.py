"""The client's transport: server lists, selection, stickiness, failover, backoff, TLS, uploads.

Every test talks to real servers on 127.0.0.1 (http.server, TLS with a development CA).
"""

from __future__ import annotations

import hashlib
import io
import random
import socket
import ssl

import pytest

from tests.requirements import machine_skip
from tests.unit.test_client_fakes import (
    USER_DN,
    FakeServer,
    Reply,
    make_pki,
    refusing_url,
    scripted,
    server_context,
)
from userpub_client.api import (
    ApiError,
    ClientError,
    PubApi,
    RefusedError,
    RetryPolicy,
    Server,
    UnavailableError,
    UnreachableError,
    parse_server,
    parse_server_list,
    servers_from,
)
from userpub_client.credentials import CredentialError, Credentials, ca_locations, make_ssl_context
from userpub_client.progress import Progress

pytestmark = pytest.mark.timeout(60)
_contexts: dict[object, ssl.SSLContext] = {}  # loading the system CAs takes a while


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def api_for(urls, pki, *, creds=None, seed=0, attempts=6, sleeps=None, **kw):
    creds = creds or Credentials()
    context = _contexts.get((creds, pki)) or _contexts.setdefault(
        (creds, pki), make_ssl_context(creds, ca_bundle=str(pki.ca_file)))
    return PubApi([parse_server(u) for u in urls], context, creds,
                  RetryPolicy(attempts=attempts, base_delay=2.0, max_delay=60.0),
                  rng=random.Random(seed), sleep=(sleeps.append if sleeps is not None
                                                  else lambda _s: None), timeout=10, **kw)


def seed_starting_with(urls, first, pki):
    """A seed whose shuffle puts ``first`` first."""
    for seed in range(100):
        if str(api_for(urls, pki, seed=seed).current) == str(parse_server(first)):
            return seed
    raise AssertionError("no seed")


# -- server lists ----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("rcds01.fnal.gov", Server("https", "rcds01.fnal.gov", 443)),
    ("rcds01.fnal.gov:8443", Server("https", "rcds01.fnal.gov", 8443)),
    ("[::1]:8443", Server("https", "::1", 8443)),
    ("https://h.example:9/", Server("https", "h.example", 9)),
    ("http://h.example", Server("http", "h.example", 80)),
    ("https://h.example/site/pubapi/", Server("https", "h.example", 443, "/site")),
])
def test_parse_server(spec, expected):
    assert parse_server(spec) == expected


@pytest.mark.parametrize("spec", ["ftp://h", "h:port", "https://", "https://u@h", "h:99999",
                                  "https://h/?q=1", "a..b.example", "x" * 64 + ".example"])
def test_parse_server_rejects(spec):
    with pytest.raises(ClientError, match="bad server"):
        parse_server(spec)


def test_server_str_and_loopback():
    assert str(parse_server("[::1]:8443")) == "https://[::1]:8443"
    assert parse_server("127.0.0.1:1").is_loopback
    assert parse_server("localhost").is_loopback
    assert not parse_server("rcds01.fnal.gov").is_loopback


def test_parse_server_list():
    servers = parse_server_list(" a.example, b.example:8443  c.example,,a.example ")
    assert [str(s) for s in servers] == [
        "https://a.example:443", "https://b.example:8443", "https://c.example:443"]


def test_server_sources_precedence():
    env = {"USERPUB_SERVERS": "u1,u2", "JOBSUB_DROPBOX_SERVER_LIST": "j1 j2"}
    assert [s.host for s in servers_from(["o1", "o2,o3"], env)] == ["o1", "o2", "o3"]
    assert [s.host for s in servers_from([], env)] == ["u1", "u2"]
    assert [s.host for s in servers_from([], {"JOBSUB_DROPBOX_SERVER_LIST": "j1 j2"})] == \
        ["j1", "j2"]
    assert [s.host for s in servers_from([], {"USERPUB_SERVERS": " ", **env} | {
        "USERPUB_SERVERS": " "})] == ["j1", "j2"]
    with pytest.raises(ClientError, match="no server given"):
        servers_from([], {})


def test_first_server_is_random(pki):
    urls = ["https://a.example", "https://b.example", "https://c.example"]
    firsts = {api_for(urls, pki, seed=seed).current.host for seed in range(40)}
    assert firsts == {"a.example", "b.example", "c.example"}


def test_ca_locations(tmp_path):
    env = {"USERPUB_CA_BUNDLE": "/b.pem", "X509_CERT_DIR": "/certs"}
    assert ca_locations(env) == ("/b.pem", "/certs")
    assert ca_locations(env, "/o.pem", "/odir") == ("/o.pem", "/odir")


# -- failover and backoff --------------------------------------------------------------------


def test_sticky_while_it_answers(pki):
    with FakeServer(scripted(Reply(body="MISSING\n")), server_context(pki)) as a, \
            FakeServer(scripted(Reply(body="MISSING\n")), server_context(pki)) as b:
        api = api_for([a.url, b.url], pki, seed=3)
        for _ in range(4):
            assert api.exists("g/x").state == "MISSING"
        assert sorted([len(a.requests), len(b.requests)]) == [0, 4]


def test_refused_connection_fails_over_at_once(pki):
    dead = refusing_url()
    with FakeServer(scripted(Reply(body="PRESENT:/cvmfs/r/sw/g/x\n")), server_context(pki)) as ok:
        sleeps: list[float] = []
        api = api_for([dead, ok.url], pki, seed=seed_starting_with([dead, ok.url], dead, pki),
                      sleeps=sleeps)
        answer = api.exists("g/x")
    assert (answer.state, answer.detail) == ("PRESENT", "/cvmfs/r/sw/g/x")
    assert str(answer.server) == ok.url
    assert sleeps == [0.0]  # the first retry is immediate, on the other server


def test_503_then_ok_with_one_server_refusing(pki):
    dead = refusing_url()
    with FakeServer(scripted(Reply(503, "busy\n"), Reply(body="MISSING\n")),
                    server_context(pki)) as flaky:
        urls = [dead, flaky.url]
        sleeps: list[float] = []
        api = api_for(urls, pki, seed=seed_starting_with(urls, dead, pki), sleeps=sleeps)
        assert api.exists("g/x").state == "MISSING"
        # dead (refused) -> flaky 503 at once -> dead after ~2 s -> flaky OK after ~4 s
        assert len(sleeps) == 3
        assert sleeps[0] == 0.0
        assert 1.0 <= sleeps[1] <= 2.0
        assert 2.0 <= sleeps[2] <= 4.0
        assert len(flaky.requests) == 2
        assert str(api.current) == flaky.url  # and it stays there
        api.exists("g/y")
        assert len(flaky.requests) == 3


def test_retry_after_is_honoured(pki):
    with FakeServer(scripted(Reply(503, "later\n", {"Retry-After": "7"}),
                             Reply(body="MISSING\n")), server_context(pki)) as srv:
        sleeps: list[float] = []
        assert api_for([srv.url], pki, sleeps=sleeps).exists("g/x").state == "MISSING"
    assert sleeps == [7.0]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 507])
def test_retriable_statuses(pki, status):
    with FakeServer(scripted(Reply(status, "no\n"), Reply(body="MISSING\n")),
                    server_context(pki)) as srv:
        assert api_for([srv.url], pki).exists("g/x").state == "MISSING"
        assert len(srv.requests) == 2


@pytest.mark.parametrize(("status", "body"), [
    (400, "Bad request: cid may contain at most one '/'\n"),
    (403, "Forbidden: /DC=org/CN=x is not in the grid-mapfile\n"), (404, ""), (413, "too big\n")])
def test_client_errors_are_final(pki, status, body):
    with FakeServer(scripted(Reply(status, body)), server_context(pki)) as a, \
            FakeServer(scripted(Reply(status, body)), server_context(pki)) as b:
        with pytest.raises(RefusedError) as info:
            api_for([a.url, b.url], pki).exists("g/x")
        assert len(a.requests) + len(b.requests) == 1
    assert info.value.status == status
    assert info.value.reason == body.strip()
    assert str(status) in str(info.value)


def test_a_server_that_cannot_publish_now_sends_the_client_to_another(pki, tmp_path):
    """The original's "Service not running" (a not-ready server of a pair) is not final."""
    tarball = tmp_path / "t.tar.gz"
    tarball.write_bytes(b"x" * 1000)
    with FakeServer(scripted(Reply(400, "Bad request: Service not running\n")),
                    server_context(pki)) as resting, \
            FakeServer(scripted(Reply(body="OK\n")), server_context(pki)) as ready:
        urls = [resting.url, ready.url]
        sleeps: list[float] = []
        api = api_for(urls, pki, seed=seed_starting_with(urls, resting.url, pki), sleeps=sleeps)
        answer = api.publish(tarball, "g/x")
    assert (answer.state, str(answer.server)) == ("OK", ready.url)
    assert sleeps == [0.0] and len(resting.requests) == 1


def test_everything_down(pki):
    urls = [refusing_url(), refusing_url()]
    sleeps: list[float] = []
    with pytest.raises(UnavailableError) as info:
        api_for(urls, pki, attempts=4, sleeps=sleeps).exists("g/x")
    assert len(info.value.errors) == 4
    assert len(sleeps) == 3
    assert "4 attempts" in str(info.value)


def test_unexpected_answer(pki):
    with FakeServer(scripted(Reply(body="<html>proxy error</html>")), server_context(pki)) as s, \
            pytest.raises(ApiError, match="unexpected answer"):
        api_for([s.url], pki).exists("g/x")


def test_untrusted_server_certificate(pki, tmp_path):
    other = make_pki(tmp_path)
    with FakeServer(scripted(Reply(body="OK\n")), server_context(other)) as srv:
        sleeps: list[float] = []
        with pytest.raises(UnreachableError, match="X509_CERT_DIR"):
            api_for([srv.url], pki, attempts=6, sleeps=sleeps).ping()
        assert sleeps == []  # verification fails the same way every time: never retried
        ctx = make_ssl_context(Credentials(), ca_dir=str(other.ca_dir))  # grid layout works
        assert PubApi([parse_server(srv.url)], ctx, Credentials()).ping() == "OK"


def test_bad_ca_and_proxy_files(tmp_path):
    with pytest.raises(CredentialError, match="cannot load CA"):
        make_ssl_context(Credentials(), ca_bundle=str(tmp_path / "nope.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a proxy")
    with pytest.raises(CredentialError, match="cannot use proxy"):
        make_ssl_context(Credentials(proxy=junk))


# -- credentials on the wire and uploads -----------------------------------------------------


def test_proxy_is_the_client_certificate(pki):
    with FakeServer(scripted(Reply(body="MISSING\n")), server_context(pki)) as srv:
        api_for([srv.url], pki, creds=Credentials(proxy=pki.proxy)).exists("g/x")
    seen = srv.requests[0]
    assert "commonName=Jane Doe 12345/commonName=" in seen.peer_subject
    assert "Authorization" not in seen.headers
    assert USER_DN.startswith("/DC=org")


def test_token_goes_in_the_authorization_header(pki):
    with FakeServer(scripted(Reply(body="MISSING\n")), server_context(pki)) as srv, \
            FakeServer(scripted(Reply(body="MISSING\n"))) as plain:
        creds = Credentials(token="tok.en.x", token_source="test")
        api_for([srv.url], pki, creds=creds).exists("g/x")
        api_for([plain.url], pki, creds=creds).exists("g/x")  # plain http, but loopback
    for seen in (srv.requests[0], plain.requests[0]):
        assert seen.headers["Authorization"] == "Bearer tok.en.x"
        assert seen.peer_subject is None
        assert seen.query == {"cid": "g/x"}


def test_upload_streams_with_content_length(pki, tmp_path):
    tarball = tmp_path / "t.tar.gz"
    data = random.Random(5).randbytes(3 * (1 << 20) + 17)
    tarball.write_bytes(data)
    with FakeServer(scripted(Reply(body="OK\n")), server_context(pki)) as srv:
        answer = api_for([srv.url], pki).publish(tarball, "g/abc")
    assert answer.state == "OK"
    seen = srv.requests[0]
    assert (seen.method, seen.endpoint, seen.query) == ("POST", "/pubapi/publish", {"cid": "g/abc"})
    assert seen.headers["Content-Length"] == str(len(data))
    assert seen.headers["Expect"] == "100-continue"
    assert "Transfer-Encoding" not in seen.headers
    assert seen.body_sha256 == hashlib.sha256(data).hexdigest()


def test_early_refusal_uploads_nothing(pki, tmp_path):
    """A server that answers before 100 Continue (ingest does for 403/413/507) gets no body."""
    tarball = tmp_path / "t.tar"
    tarball.write_bytes(b"x" * (1 << 20))
    with FakeServer(scripted(Reply(body="OK\n")), server_context(pki)) as srv:
        srv.early = Reply(413, "Request Entity Too Large\n")
        with pytest.raises(RefusedError) as info:
            api_for([srv.url], pki).publish(tarball, "g/abc")
    assert info.value.status == 413
    assert srv.requests == []


def test_early_507_fails_over_to_the_other_server(pki, tmp_path):
    tarball = tmp_path / "t.tar"
    tarball.write_bytes(b"y" * 1000)
    with FakeServer(scripted(Reply(body="OK\n")), server_context(pki)) as full, \
            FakeServer(scripted(Reply(body="OK\n")), server_context(pki)) as fine:
        full.early = Reply(507, "Insufficient Storage: spool full\n")
        urls = [full.url, fine.url]
        sleeps: list[float] = []
        api = api_for(urls, pki, seed=seed_starting_with(urls, full.url, pki), sleeps=sleeps)
        assert api.publish(tarball, "g/abc").state == "OK"
    assert full.requests == []
    assert fine.requests[0].body_length == 1000
    assert sleeps == [0.0]


# -- progress --------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_when_not_a_terminal():
    out = io.StringIO()
    bar = Progress(100, out)
    assert not bar.enabled
    bar.update(50)
    bar.update(50)
    bar.finish()
    assert out.getvalue() == ""


def test_progress_on_a_terminal():
    out = Terminal()
    ticks = iter(range(100))
    bar = Progress(4 << 20, out, clock=lambda: float(next(ticks)))
    assert bar.enabled
    bar.update(1 << 20)
    bar.update(3 << 20)
    bar.finish()
    text = out.getvalue()
    assert text.startswith("\r[")
    assert " 25% 1.0 MiB/4.0 MiB" in text
    assert "100% 4.0 MiB/4.0 MiB" in text
    assert text.endswith("\n")


def test_upload_draws_progress_only_on_a_terminal(pki, tmp_path):
    tarball = tmp_path / "t.tar"
    tarball.write_bytes(b"z" * (2 << 20))
    silent, tty = io.StringIO(), Terminal()
    with FakeServer(scripted(Reply(body="OK\n")), server_context(pki)) as srv:
        api = api_for([srv.url], pki)
        api.publish(tarball, "g/a", Progress(2 << 20, silent))
        api.publish(tarball, "g/b", Progress(2 << 20, tty))
    assert silent.getvalue() == ""
    assert "100% 2.0 MiB/2.0 MiB" in tty.getvalue()


def test_ssl_context_verifies_by_default():
    ctx = make_ssl_context(Credentials())
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname


def test_an_untrusted_server_is_left_out_at_once_for_the_other(pki, tmp_path):
    other = make_pki(tmp_path / "other")
    with FakeServer(scripted(Reply(body="OK\n")), server_context(other)) as bad, \
            FakeServer(scripted(Reply(body="PRESENT:/x\n")), server_context(pki)) as good:
        urls = [bad.url, good.url]
        sleeps: list[float] = []
        api = api_for(urls, pki, seed=seed_starting_with(urls, bad.url, pki), sleeps=sleeps)
        assert api.exists("g/x").state == "PRESENT"
        assert api.exists("g/y").state == "PRESENT"  # the session keeps to the good one
    assert sleeps == []
    assert len(good.requests) == 2 and bad.requests == []


def test_a_name_that_does_not_resolve_is_not_retried(pki):
    name = "userpub-test-no-such-host.invalid"
    try:
        socket.getaddrinfo(name, 443)
    except socket.gaierror as err:
        if err.errno == socket.EAI_AGAIN:
            machine_skip("no DNS resolver answers on this machine (EAI_AGAIN)")
    else:
        machine_skip(f"this machine's resolver answers for {name}")
    sleeps: list[float] = []
    with pytest.raises(UnreachableError, match="cannot resolve the server's name"):
        api_for([f"https://{name}"], pki, attempts=6, sleeps=sleeps).exists("g/x")
    assert sleeps == []
