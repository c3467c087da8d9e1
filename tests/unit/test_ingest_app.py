"""The Bottle app called as WSGI (no sockets): answers byte for byte, spool effects, metrics.

Real spool, real catalog over local repositories, real authenticator fed verified chains
the way the TLS adapter puts them in the environ.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import wsgiref.util

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry

from devsite.pki import CertificateAuthority, make_proxy
from ingest.app import make_app, make_plain_app
from ingest.auth import Authenticator
from ingest.connection import ChunkedReader
from ingest.handlers import StampLimiter
from ingest.readiness import Readiness
from ingest.upload import WriteBehind
from metrics import IngestMetrics
from publisher.repositories.catalog import Catalog
from spool import Spool
from tests.helpers import publishers_alive, tar_body, write_config
from userpub.config import load_config

USER_DN = "/DC=org/DC=example/OU=People/CN=Jane Doe 12345"
TEXT = [("Content-Type", "text/plain"), ("Cache-Control", "max-age=0")]


class Site:
    def __init__(self, tmp_path, **ingest):
        gridmap = tmp_path / "grid-mapfile"
        gridmap.write_text(f'"{USER_DN}" janedoe\n')
        settings = {"grid_mapfile": str(gridmap), "spool_reserve_bytes": 0,
                    "max_upload_bytes": 10_000, **ingest}
        extra = "[ingest]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        self.config = load_config(write_config(tmp_path / "site", extra=extra))
        self.spool = Spool(self.config.server.spool)
        self.spool.ensure_layout(tuple(r.name for r in self.config.repositories))
        self.registry = CollectorRegistry()
        self.metrics = IngestMetrics(self.registry)
        assert self.config.ingest is not None
        self.readiness = Readiness(self.config, self.spool)
        self.app = make_app(self.config, self.spool, Catalog.from_config(self.config),
                            self.metrics, Authenticator.from_config(self.config.ingest),
                            self.readiness)

    def publish_tree(self, cid, repo=0):
        root = self.config.repositories[repo].root
        (root / "sw" / cid).mkdir(parents=True)

    def incoming(self):
        return sorted(p.name for p in self.spool.incoming.iterdir())

    def tmp(self):
        return sorted(p.name for p in self.spool.tmp.iterdir())

    def sample(self, name, **labels):
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def chain():
    ca = CertificateAuthority(key_type="ec")
    proxy = make_proxy(ca.issue_user(USER_DN, key_type="ec"), key_type="ec")
    return {f"SSL_CLIENT_CERT_CHAIN_{n}": c.public_bytes(Encoding.PEM).decode()
            for n, c in enumerate([proxy.cert, *proxy.chain])}


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def call(app, method, path, body=b"", *, env=None, stream=None, chunked=False):
    """(status line, headers, body) of one request."""
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "REMOTE_ADDR": "192.0.2.9", "wsgi.input": stream or io.BytesIO(body)}
    if chunked:
        environ["wsgi.input_terminated"] = True
    elif method == "POST":
        environ["CONTENT_LENGTH"] = str(len(body))
    environ.update(env or {})
    wsgiref.util.setup_testing_defaults(environ)
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers

    out = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], out


def expect(result, status, body, *, extra_headers=()):
    assert result[0] == status
    assert result[2] == body
    assert result[1] == [*TEXT, *extra_headers, ("Content-Length", str(len(body)))]


def test_ping_and_config_need_no_credentials(site):
    with publishers_alive(site.config):
        expect(call(site.app, "GET", "/pubapi/ping"), "200 OK", b"OK\n")
    expect(call(site.app, "GET", "/pubapi/config"), "200 OK",
           b"repos:repo1.example.org,repo2.example.org\n")


def test_exists_update_status_answers(site, chain):
    def get(route, cid="grp/abc"):
        return call(site.app, "GET", f"/pubapi/{route}?cid={cid}", env=chain)

    expect(get("exists"), "200 OK", b"MISSING\n")
    expect(get("update"), "200 OK", b"MISSING\n")
    expect(get("status"), "200 OK", b"MISSING\n")
    assert site.incoming() == []
    site.publish_tree("grp/abc", repo=1)
    present = b"PRESENT:/cvmfs/repo2.example.org/sw/grp/abc\n"
    expect(get("exists"), "200 OK", present)
    expect(get("status"), "200 OK", present)
    expect(get("update"), "200 OK", present)
    assert site.incoming() == ["grp%2Fabc@stamp"]  # the update queued an access stamp
    # status follows the spool: queued, publishing, failed
    with site.spool.writer("grp/new", "x") as w:
        w.commit()
    expect(get("status", "grp/new"), "200 OK", b"QUEUED\n")
    claimed = site.spool.claim(site.spool.incoming / "grp%2Fnew", "repo1.example.org")
    expect(get("status", "grp/new"), "200 OK", b"PUBLISHING\n")
    site.spool.fail(site.spool.read_entry(claimed), "not a tarball:\n  bad magic")
    expect(get("status", "grp/new"), "200 OK", b"FAILED:not a tarball: bad magic\n")


def test_publish_queues_the_body_durably(site, chain):
    body = tar_body(5000)
    expect(call(site.app, "POST", "/pubapi/publish?cid=grp/abc", body, env=chain),
           "200 OK", b"OK\n")
    assert site.incoming() == ["grp%2Fabc"]
    entry = site.spool.read_entry(site.spool.incoming / "grp%2Fabc")
    assert entry.payload.read_bytes() == body
    assert entry.submitter == f"janedoe ({USER_DN})"
    assert site.tmp() == []
    assert site.sample("userpub_upload_bytes_total") == 5000
    # The same CID again while queued: OK, body read and discarded, nothing added.
    expect(call(site.app, "POST", "/pubapi/publish?cid=grp/abc", b"other", env=chain),
           "200 OK", b"OK\n")
    assert site.incoming() == ["grp%2Fabc"]
    assert entry.payload.read_bytes() == body
    assert site.sample("userpub_upload_bytes_total") == 5000


def test_publish_of_a_published_cid_stamps_it(site, chain):
    site.publish_tree("grp/old")
    expect(call(site.app, "POST", "/pubapi/publish?cid=grp/old", b"tarball", env=chain),
           "200 OK", b"PRESENT:/cvmfs/repo1.example.org/sw/grp/old\n")
    assert site.incoming() == ["grp%2Fold@stamp"]


@pytest.mark.parametrize(("path", "body"), [
    ("/pubapi/exists", b"Bad request: exists with no cid\n"),
    ("/pubapi/exists?cid=", b"Bad request: exists with no cid\n"),
    ("/pubapi/update?cid=.hidden", b'Bad request: cid may not start with "."\n'),
    ("/pubapi/status?cid=a/b/c", b"Bad request: at most one slash allowed in cid\n"),
    ("/pubapi/exists?cid=a'b", b"Bad request: disallowed character in cid\n"),
])
def test_bad_requests(site, chain, path, body):
    expect(call(site.app, "GET", path, env=chain), "400 Bad request", body)


def test_credentials_are_required_except_for_ping_and_config(site):
    for method, route in (("GET", "exists"), ("GET", "update"), ("GET", "status"),
                          ("POST", "publish")):
        expect(call(site.app, method, f"/pubapi/{route}?cid=a"), "403 Access denied",
               b"Token or client cert required\n")
    assert site.sample("userpub_auth_failures_total", reason="no_credentials") == 4
    assert site.incoming() == [] and site.tmp() == []


def test_unknown_api_and_wrong_method(site, chain):
    expect(call(site.app, "GET", "/pubapi/nothing", env=chain), "404 Not found",
           b"Unrecognized api\n")
    expect(call(site.app, "GET", "/", env=chain), "404 Not found", b"Unrecognized api\n")
    status, headers, body = call(site.app, "GET", "/pubapi/publish?cid=a", env=chain)
    assert (status, body) == ("405 Method Not Allowed", b"Method not allowed\n")
    assert ("Allow", "POST") in headers
    assert call(site.app, "POST", "/pubapi/exists?cid=a", env=chain)[0].startswith("405")
    assert site.sample("userpub_http_requests_total", route="unknown", status="404") == 2


class Exploding:
    """A request body that must not be read."""

    def read(self, size=-1):
        raise AssertionError("the body was read")


def test_too_large_by_content_length_is_refused_before_reading(site, chain):
    env = {**chain, "CONTENT_LENGTH": "10001"}
    status, headers, body = call(site.app, "POST", "/pubapi/publish?cid=a", env=env,
                                 stream=Exploding())
    assert status == "413 Request Entity Too Large"
    assert body == b"Upload too large: the limit is 10000 bytes\n"
    assert ("Connection", "close") in headers
    assert site.tmp() == [] and site.incoming() == []


def test_too_large_chunked_is_refused_while_reading(site, chain):
    status, _, _ = call(site.app, "POST", "/pubapi/publish?cid=a", b"x" * 10_001, env=chain,
                        chunked=True)
    assert status == "413 Request Entity Too Large"
    assert site.tmp() == [] and site.incoming() == []
    expect(call(site.app, "POST", "/pubapi/publish?cid=a", tar_body(10_000), env=chain,
                chunked=True), "200 OK", b"OK\n")


def test_invalid_content_length(site, chain):
    for value in ("-5", "12abc"):
        env = {**chain, "CONTENT_LENGTH": value}
        expect(call(site.app, "POST", "/pubapi/publish?cid=a", env=env, stream=Exploding()),
               "400 Bad request", b"Bad request: invalid Content-Length\n",
               extra_headers=[("Connection", "close")])
    assert site.incoming() == [] and site.tmp() == []


def test_short_body_leaves_nothing(site, chain):
    env = {**chain, "CONTENT_LENGTH": "100"}
    expect(call(site.app, "POST", "/pubapi/publish?cid=a", env=env, stream=io.BytesIO(b"x" * 60)),
           "400 Bad request", b"Bad request: body shorter than Content-Length (60 of 100 bytes)\n",
           extra_headers=[("Connection", "close")])
    assert site.tmp() == [] and site.incoming() == []


class Breaking:
    """Gives some data, then the connection breaks (read() only, like a plain WSGI input)."""

    def __init__(self):
        self.calls = 0

    def read(self, size=-1):
        self.calls += 1
        if self.calls > 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        return b"y" * 1000


def test_connection_lost_mid_upload_leaves_nothing(site, chain):
    env = {**chain, "CONTENT_LENGTH": "9000"}
    status, _, body = call(site.app, "POST", "/pubapi/publish?cid=a", env=env, stream=Breaking())
    assert status == "400 Bad request"
    assert body == b"Bad request: upload connection lost after 2000 of 9000 bytes\n"
    assert site.tmp() == [] and site.incoming() == []
    assert site.sample("userpub_uploads_in_progress") == 0


def test_insufficient_storage(tmp_path, chain):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    site = Site(tmp_path, spool_reserve_bytes=max(0, free - 50_000_000),
                max_upload_bytes=10**12)
    env = {**chain, "CONTENT_LENGTH": str(500_000_000)}
    expect(call(site.app, "POST", "/pubapi/publish?cid=a", env=env, stream=Exploding()),
           "507 Insufficient Storage", b"Insufficient storage in the spool, try again later\n")
    # a small upload still fits above the reserve
    expect(call(site.app, "POST", "/pubapi/publish?cid=b", tar_body(1024), env=chain),
           "200 OK", b"OK\n")
    # nothing is stored for a published or queued CID: no space needed
    site.publish_tree("grp/old")
    for cid, answer in (("grp/old", b"PRESENT:/cvmfs/repo1.example.org/sw/grp/old\n"),
                        ("b", b"OK\n")):
        expect(call(site.app, "POST", f"/pubapi/publish?cid={cid}", b"y" * 60_000_000,
                    env=chain), "200 OK", answer)


def test_one_access_log_line_per_request(site, chain, caplog):
    caplog.set_level(logging.INFO, "userpub.ingest.access")
    call(site.app, "POST", "/pubapi/publish?cid=grp/abc", tar_body(2048), env=chain)
    call(site.app, "GET", "/pubapi/exists?cid=grp/abc")
    call(site.app, "GET", "/nowhere")
    lines = [r.getMessage() for r in caplog.records if r.name == "userpub.ingest.access"]
    assert len(lines) == 3
    assert lines[0].startswith(f'192.0.2.9 identity="{USER_DN}" route=publish cid="grp/abc" '
                               "status=200 bytes=2048 duration=")
    assert 'identity="refused no_credentials: -" route=exists cid="-" status=403' in lines[1]
    assert "route=unknown" in lines[2] and "status=404" in lines[2]


def test_plain_app_serves_only_ping_config_and_metrics(site):
    app = make_plain_app(site.config, site.metrics, site.registry, site.readiness)
    with publishers_alive(site.config):
        expect(call(app, "GET", "/pubapi/ping"), "200 OK", b"OK\n")
    expect(call(app, "GET", "/pubapi/config"), "200 OK",
           b"repos:repo1.example.org,repo2.example.org\n")
    status, _, body = call(app, "GET", "/metrics")
    assert status == "200 OK" and b'userpub_http_requests_total{route="ping",status="200"}' in body
    for route in ("exists?cid=a", "publish?cid=a", "status?cid=a", "update?cid=a"):
        assert call(app, "GET", f"/pubapi/{route}")[0] == "404 Not found"


# -- the chunked reader -----------------------------------------------------------------------


class Recorder(io.BufferedReader):
    """Remembers the largest single transfer asked of it."""

    largest = 0

    def read(self, size=-1):
        self.largest = max(self.largest, size if size and size > 0 else 0)
        return super().read(size)

    def readinto(self, view):
        self.largest = max(self.largest, len(view))
        return super().readinto(view)


def chunked(data: bytes) -> Recorder:
    return Recorder(io.BytesIO(data))


def test_chunked_reader_decodes_extensions_and_trailers():
    raw = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: a\r\n\r\nNEXT"
    reader = chunked(raw)
    body = ChunkedReader(reader, 0)
    assert body.read(3) == b"hel" and body.read(4) == b"lo w"  # across chunk boundaries
    assert body.read(100) == b"orld"
    assert body.read(100) == b"" and body.closed
    assert reader.read() == b"NEXT"  # nothing beyond the body was consumed


def test_chunked_reader_reads_huge_chunks_in_bounded_pieces():
    size = 3 << 20
    reader = chunked(b"%x\r\n" % size + b"a" * size + b"\r\n0\r\n\r\n")
    body = ChunkedReader(reader, 0)
    total = 0
    while data := body.read(65536):
        total += len(data)
    assert total == size and reader.largest <= 65536


@pytest.mark.parametrize(("raw", "error"), [
    (b"zz\r\nabc", ValueError),
    (b"5\r\nabc", ValueError),                 # truncated
    (b"3\r\nabcXY0\r\n\r\n", ValueError),      # no CRLF after the data
    (b"3\r\nabc\r\n", ValueError),             # ends without the last chunk
    (b"1" * 5000, ValueError),                 # endless size line
    (b"10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", OSError),  # over the limit (10 bytes)
])
def test_chunked_reader_refuses_bad_bodies(raw, error):
    body = ChunkedReader(chunked(raw), 10)
    with pytest.raises(error):
        while body.read(4):
            pass


# -- write-behind -----------------------------------------------------------------------------


def test_write_behind_keeps_order_and_reports_errors():
    written = []
    sink = WriteBehind(lambda view: written.append(bytes(view)), 4)
    for n in range(10):
        view = sink.buffer()
        view[:3] = b"%03d" % n
        sink.put(view, 3)
    sink.close()
    assert written == [b"%03d" % n for n in range(10)]

    def failing(view):
        raise OSError(28, "No space left on device")

    sink = WriteBehind(failing, 4)
    with pytest.raises(OSError, match="No space"):
        for _ in range(5):
            sink.put(sink.buffer(), 1)
    sink.abort()
    with pytest.raises(OSError, match="No space"):
        sink.close()
    assert not [t for t in threading.enumerate() if t.name == "ingest-write"]


def test_ping_is_ok_only_while_this_host_can_accept_and_publish(tmp_path):
    """The original's "not running" answer while no publisher runs, the spool has no room,
    or the server stops; OK otherwise (cached for a second)."""
    not_running = b"Bad request: Service not running\n"
    clock = [0.0]
    site = Site(tmp_path)
    site.readiness.clock = lambda: clock[0]
    expect(call(site.app, "GET", "/pubapi/ping"), "400 Bad request", not_running)
    with publishers_alive(site.config):
        expect(call(site.app, "GET", "/pubapi/ping"), "400 Bad request", not_running)  # cached
        clock[0] += 1.5
        expect(call(site.app, "GET", "/pubapi/ping"), "200 OK", b"OK\n")
        site.readiness.reserve = 1 << 62  # more than any disk: no room for an upload
        clock[0] += 1.5
        expect(call(site.app, "GET", "/pubapi/ping"), "400 Bad request", not_running)
        site.readiness.reserve = 0
        clock[0] += 1.5
        expect(call(site.app, "GET", "/pubapi/ping"), "200 OK", b"OK\n")
        site.readiness.stop()
        expect(call(site.app, "GET", "/pubapi/ping"), "400 Bad request", not_running)


def test_exists_that_answers_present_stamps_the_cid_at_most_once_an_hour(tmp_path, chain):
    clock = [1000.0]
    site = Site(tmp_path)
    site.publish_tree("grp/used")
    app = make_app(site.config, site.spool, Catalog.from_config(site.config), site.metrics,
                   Authenticator.from_config(site.config.ingest), site.readiness,
                   StampLimiter(3600.0, clock=lambda: clock[0]))
    present = b"PRESENT:/cvmfs/repo1.example.org/sw/grp/used\n"

    def exists(cid="grp/used"):
        return call(app, "GET", f"/pubapi/exists?cid={cid}", env=chain)

    expect(exists(), "200 OK", present)
    assert site.incoming() == ["grp%2Fused@stamp"]
    for entry in site.spool.incoming.iterdir():
        shutil.rmtree(entry)
    clock[0] += 1800
    expect(exists(), "200 OK", present)
    assert site.incoming() == []  # stamped half an hour ago: not again
    clock[0] += 1801
    expect(exists(), "200 OK", present)
    assert site.incoming() == ["grp%2Fused@stamp"]
    expect(exists("grp/absent"), "200 OK", b"MISSING\n")
    assert site.incoming() == ["grp%2Fused@stamp"]


def test_exists_stamps_nothing_when_switched_off(tmp_path, chain):
    site = Site(tmp_path, stamp_on_exists=False)
    site.publish_tree("grp/used")
    expect(call(site.app, "GET", "/pubapi/exists?cid=grp/used", env=chain), "200 OK",
           b"PRESENT:/cvmfs/repo1.example.org/sw/grp/used\n")
    assert site.incoming() == []
