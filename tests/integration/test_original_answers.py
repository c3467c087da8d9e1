"""Every answer a client can see, against cvmfs-user-pub 1.17's, byte for byte.

``ANSWERS`` is the table of docs/api.md ("The original's answers"): a request, the original's
status and body, and ours where we deliberately differ (``SAME`` otherwise). Each row is sent
to the real server over real TLS (paths exactly as written: ``http.client`` does not normalise
them), and the documentation must hold the same table.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import time
from dataclasses import dataclass

import pytest

from tests.helpers import REPO_ROOT, publishers_alive, tar_body
from tests.pki import TestPKI, TokenIssuerServer, ingest_config, running_ingest

AUD = "https://pub1.example.org"
SAME = None
LIMIT = 1_000_000
BODY = tar_body(4096)
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()
OTHER_SHA256 = "0" * 64


@dataclass(frozen=True)
class Row:
    """One request and the answers: the original's, and ours when it differs."""

    request: str  # as documented, e.g. "GET /pubapi/exists?cid=.x"
    credentials: str  # "proxy", "none", "stranger", "basic", "bearer-only", or a token name
    original: tuple[int, str]
    ours: tuple[int, str] | None = SAME
    why: str = ""  # for a deliberate difference
    body: bytes | None = None

    def doc_line(self) -> str:
        """The row of docs/api.md."""
        def show(answer: tuple[int, str]) -> str:
            return f"`{answer[0]}` `{answer[1].rstrip(chr(10))}`"
        ours = "same" if self.ours is None else show(self.ours)
        return (f"| `{self.request}` | {self.credentials} | {show(self.original)} | {ours} |"
                f" {self.why} |")


PRESENT = "PRESENT:/cvmfs/repo1.example.org/sw/grp/present\n"
ANSWERS = [
    Row("GET /pubapi/ping", "none", (200, "OK\n")),
    Row("GET /pubapi/config", "none", (200, "repos:repo1.example.org,repo2.example.org\n")),
    Row("GET /pubapi/exists", "proxy", (400, "Bad request: exists with no cid\n")),
    Row("GET /pubapi/update?cid=", "proxy", (400, "Bad request: update with no cid\n")),
    Row("POST /pubapi/publish", "proxy", (400, "Bad request: publish with no cid\n"),
        body=BODY),
    Row("GET /pubapi/exists?cid=.x", "proxy", (400, 'Bad request: cid may not start with "."\n')),
    Row("GET /pubapi/exists?cid=a'b", "proxy", (400, "Bad request: disallowed character in cid\n")),
    Row("GET /pubapi/exists?cid=a%5Cb", "proxy",
        (400, "Bad request: disallowed character in cid\n")),
    Row("GET /pubapi/exists?cid=a/b/c", "proxy",
        (400, "Bad request: at most one slash allowed in cid\n")),
    Row("GET /pubapi/exists?cid=grp//present", "proxy", (200, PRESENT)),
    Row("GET /pubapi/exists?cid=grp/present/", "proxy", (200, PRESENT)),
    Row("GET /pubapi/exists?cid=grp%2Fpresent", "proxy", (200, PRESENT)),
    Row("GET /pubapi/exists?cid=grp/present", "none", (403, "Token or client cert required\n")),
    Row("GET /pubapi/exists?cid=grp/present", "stranger", (403, "Unrecognized DN\n")),
    Row("GET /pubapi/exists?cid=grp/present", "basic",
        (403, "Unrecognized authorization scheme\n")),
    Row("GET /pubapi/exists?cid=grp/present", "bearer-only",
        (403, "Failure to parse Authorization\n")),
    Row("GET /pubapi/exists?cid=grp/present", "evil-token", (403, "Untrusted token issuer\n")),
    Row("GET /pubapi/exists?cid=grp/present", "no-scope-token",
        (403, "compute.create scope missing from token\n")),
    Row("GET /pubapi/exists?cid=grp/present", "expired-token",
        (403, "Error decoding token: <scitokens' exception text>\n"),
        (403, "Error decoding token: expired\n"), "the reason in our words"),
    Row("GET /pubapi/nothing", "proxy", (404, "Unrecognized api\n")),
    Row("GET //pubapi/exists?cid=grp/present", "proxy", (200, PRESENT)),
    Row("GET /pubapi//exists?cid=grp/present", "proxy", (200, PRESENT)),
    Row("GET /pubapi/exists/?cid=grp/present", "proxy", (404, "Unrecognized api\n"),
        (200, PRESENT), "paths as Apache would route them with the trailing slash dropped"),
    Row("GET /pubapi/status?cid=grp/present", "proxy", (404, "Unrecognized api\n"),
        (200, PRESENT), "a route of ours: QUEUED, PUBLISHING, PRESENT, FAILED:<reason>, MISSING"),
    Row("GET /pubapi/publish?cid=grp/get", "proxy", (200, "OK\n"),
        (405, "Method not allowed\n"), "the original queued an empty tarball"),
    Row("GET /pubapi/exists?cid=a/../b", "proxy", (200, "MISSING\n"),
        (400, 'Bad request: cid may not contain ".." components\n'),
        "the original's normalisation turned it into another CID (b)"),
    Row("GET /pubapi/exists?cid=/abs", "proxy", (200, "MISSING\n"),
        (400, 'Bad request: cid may not start with "/"\n'),
        "the original wrote such uploads outside its queue directory"),
    Row("GET /pubapi/exists?cid=a/.b", "proxy", (200, "MISSING\n"),
        (400, 'Bad request: cid components may not start with "."\n'),
        "hidden names are the publisher's and CVMFS's own"),
    Row(f"POST /pubapi/publish?cid=grp/{OTHER_SHA256}", "proxy", (200, "OK\n"),
        (400, f"Bad request: cid names sha256 {OTHER_SHA256} but the tarball's sha256 is "
              f"{BODY_SHA256}\n"),
        "nobody publishes under the hash of someone else's tarball", body=BODY),
    Row("POST /pubapi/publish?cid=grp/junk", "proxy", (200, "OK\n"),
        (400, "Bad request: not a tar archive (too short)\n"),
        "the original answered OK and the publication failed unseen", body=b"not a tarball"),
    Row("POST /pubapi/publish?cid=grp/big", "proxy",
        (413, "<Apache's HTML page>\n"),
        (413, f"Upload too large: the limit is {LIMIT} bytes\n"),
        "one line, before anything is read", body=bytes(LIMIT + 1)),
]
# Answered in states this server is not in while the table runs; tested where named.
ELSEWHERE = [
    Row("GET /pubapi/ping", "none (this host cannot publish)",
        (400, "Bad request: Service not running\n"), SAME,
        "test_ping_answers_not_running_while_no_publisher_runs"),
    Row("POST /pubapi/publish?cid=grp/x", "proxy (the spool is full)",
        (400, "Bad request: error getting publish data\n"),
        (507, "Insufficient storage in the spool, try again later\n"),
        "a 5xx that clients retry (tests/integration/test_hostile_disks.py)", body=BODY),
    Row("GET /pubapi/status?cid=grp/bad", "proxy (its publication failed)",
        (404, "Unrecognized api\n"), (200, "FAILED:<the publisher's reason>\n"),
        "a route of ours (tests/integration/test_hostile_input.py)"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def issuers(pki):
    with TokenIssuerServer(pki) as server:
        server.issuer("good")
        server.issuer("evil")
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki, issuers):
    mp = pytest.MonkeyPatch()
    mp.setenv("SSL_CERT_FILE", str(pki.ca_file))
    config = ingest_config(tmp_path_factory.mktemp("site"), pki, http=False,
                           token_issuers=[issuers.issuers["good"].issuer],
                           token_audiences=[AUD], max_upload_bytes=LIMIT)
    assert config.repositories[0].root is not None
    (config.repositories[0].root / "sw" / "grp" / "present").mkdir(parents=True)
    with publishers_alive(config), running_ingest(config) as (bound, _):
        yield config, bound.https[1]
    mp.undo()


def send(pki: TestPKI, issuers: TokenIssuerServer, port: int, row: Row) -> tuple[int, str]:
    method, _, path = row.request.partition(" ")
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    headers: dict[str, str] = {}
    if row.credentials in ("proxy", "stranger"):
        ctx.load_cert_chain(pki[row.credentials])
    elif row.credentials == "basic":
        headers["Authorization"] = "Basic amFuZTpzZWNyZXQ="
    elif row.credentials == "bearer-only":
        headers["Authorization"] = "Bearer"
    elif row.credentials.endswith("-token"):
        good = issuers.issuers["good"]
        token = {"evil-token": lambda: issuers.issuers["evil"].token(audience=AUD),
                 "no-scope-token": lambda: good.token({"scope": "compute.read"}, audience=AUD),
                 "expired-token": lambda: good.token({"exp": int(time.time()) - 300,
                                                      "iat": int(time.time()) - 900},
                                                     audience=AUD)}[row.credentials]()
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    try:
        conn.request(method, path, body=row.body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("row", ANSWERS, ids=[f"{r.request} [{r.credentials}]" for r in ANSWERS])
def test_every_answer_is_the_originals_or_a_documented_difference(server, pki, issuers, row):
    _, port = server
    expected = row.original if row.ours is None else row.ours
    assert send(pki, issuers, port, row) == expected


def test_the_documentation_holds_the_same_table():
    doc = (REPO_ROOT / "docs" / "api.md").read_text()
    missing = [row.doc_line() for row in ANSWERS + ELSEWHERE if row.doc_line() not in doc]
    assert not missing, "docs/api.md lacks these rows:\n" + "\n".join(missing)


def test_ping_answers_not_running_while_no_publisher_runs(tmp_path, pki, issuers):
    config = ingest_config(tmp_path / "site", pki, http=False)
    row = ELSEWHERE[0]
    with running_ingest(config) as (bound, _):
        port = bound.https[1]
        assert send(pki, issuers, port, Row("GET /pubapi/ping", "none", (0, ""))) == row.original
        with publishers_alive(config):
            time.sleep(1.1)  # the readiness answer is cached for a second
            assert send(pki, issuers, port, Row("GET /pubapi/ping", "none", (0, ""))) == \
                (200, "OK\n")


def test_the_plain_listener_routes_paths_as_apache_does(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki)
    with publishers_alive(config), running_ingest(config) as (bound, _):
        assert bound.http is not None
        for path in ("/pubapi/config", "//pubapi/config", "/pubapi//config", "/pubapi/config/"):
            conn = http.client.HTTPConnection("127.0.0.1", bound.http[1], timeout=30)
            conn.request("GET", path)
            response = conn.getresponse()
            assert (response.status, response.read()) == \
                (200, b"repos:repo1.example.org,repo2.example.org\n"), path
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", bound.http[1], timeout=30)
        conn.request("GET", "//pubapi//nothing/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (404, b"Unrecognized api\n")

