"""Uploads over real TLS: chunked, interrupted, short, too large, out of space.

Whatever goes wrong, nothing reaches ``incoming/`` and the upload's ``tmp/`` entry is gone.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import requests

from spool import Spool
from tests.helpers import tar_body, wait_for
from tests.pki import TestPKI, ingest_config, running_ingest
from tests.requirements import root, tool

MIB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


class Site:
    def __init__(self, config, bound, server, pki):
        self.config, self.server, self.pki = config, server, pki
        self.port = bound.https[1]
        self.base = f"https://127.0.0.1:{self.port}"
        self.spool = Spool(config.server.spool)

    def post(self, path, data, **kw):
        return requests.post(self.base + path, data=data, cert=self.pki.cert("proxy"),
                             verify=str(self.pki.ca_file), timeout=60, **kw)

    def curl(self, path, *args):
        out = subprocess.run(
            [tool("curl"), "-sS", "-w", "\n%{http_code}", "--cacert", str(self.pki.ca_file),
             "--cert", str(self.pki["proxy"]), "--key", str(self.pki["proxy"]), *args,
             self.base + path], capture_output=True, text=True, timeout=60, check=False)
        body, _, code = out.stdout.rpartition("\n")
        return code, body

    def connect(self) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
        ctx.load_cert_chain(self.pki["proxy"])
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port)),
                               server_hostname="localhost")

    def count(self, route, status):
        return self.server.registry.get_sample_value(
            "userpub_http_requests_total", {"route": route, "status": status}) or 0.0

    def clean(self):
        """Nothing queued, nothing left in tmp/, no upload in progress."""
        return (list(self.spool.incoming.iterdir()) == [] and list(self.spool.tmp.iterdir()) == []
                and self.server.registry.get_sample_value("userpub_uploads_in_progress") == 0)


@pytest.fixture
def site(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki, http=False, max_upload_bytes=8 * MIB)
    with running_ingest(config) as (bound, server):
        yield Site(config, bound, server, pki)


def payload(size: int) -> bytes:
    """A valid tarball of ``size`` bytes (the ingest judges what it receives)."""
    return tar_body(size, seed=size)


def queued(site, cid):
    entry = site.spool.read_entry(site.spool.incoming / cid.replace("/", "%2F"))
    return entry.payload.read_bytes()


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One whole response (headers and Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_chunked_uploads(site, tmp_path):
    body = payload(5 * MIB + 123)

    def pieces():
        for start in range(0, len(body), 100_000):
            yield body[start:start + 100_000]

    r = site.post("/pubapi/publish?cid=grp/gen", pieces())
    assert (r.status_code, r.text) == (200, "OK\n")
    assert queued(site, "grp/gen") == body
    source = tmp_path / "code.tar"
    source.write_bytes(body)
    assert site.curl("/pubapi/publish?cid=grp/curl", "-T", str(source), "-X", "POST",
                     "-H", "Transfer-Encoding: chunked") == ("200", "OK\n")
    assert queued(site, "grp/curl") == body
    assert list(site.spool.tmp.iterdir()) == []


def test_keep_alive_survives_uploads_and_early_answers(site):
    tls = {"cert": site.pki.cert("proxy"), "verify": str(site.pki.ca_file)}  # REQUESTS_CA_BUNDLE
    with requests.Session() as session:                                      # beats session.verify
        r = session.post(site.base + "/pubapi/publish?cid=a'b", data=payload(3 * MIB), **tls)
        assert r.status_code == 400 and "Connection" not in r.headers  # drained, kept alive
        r = session.post(site.base + "/pubapi/publish?cid=grp/ka", data=payload(MIB), **tls)
        assert (r.status_code, r.text) == (200, "OK\n")
        assert session.get(site.base + "/pubapi/status?cid=grp/ka", **tls).text == "QUEUED\n"


def test_client_disconnecting_mid_upload_leaves_nothing(site):
    tls = site.connect()
    tls.sendall(b"POST /pubapi/publish?cid=grp/cut HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 6000000\r\n\r\n" + payload(2 * MIB))
    wait_for(lambda: list(site.spool.tmp.iterdir()), 10)  # the upload has started
    tls.close()  # no close_notify, no more data: the client vanished
    wait_for(lambda: site.count("publish", "400") == 1 and site.clean(), 20,
             "the interrupted upload left something behind")


def test_short_body_is_a_400(site):
    tls = site.connect()
    tls.sendall(b"POST /pubapi/publish?cid=grp/short HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 100000\r\n\r\n" + payload(50_000))
    with socket.socket(fileno=os.dup(tls.fileno())) as dup:
        dup.shutdown(socket.SHUT_WR)  # end of the request stream, the reply can still come
    answer = read_response(tls)
    tls.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad request\r\n")
    assert answer.endswith(b"\r\n\r\nBad request: body shorter than Content-Length (50000 of "
                           b"100000 bytes)\n")
    wait_for(site.clean, 10)


def test_body_over_the_limit(site, tmp_path):
    big = tmp_path / "big.tar"
    big.write_bytes(payload(20 * MIB))
    limit = "Upload too large: the limit is 8388608 bytes\n"
    # Content-Length: refused before reading; curl (Expect: 100-continue) sends nothing
    assert site.curl("/pubapi/publish?cid=grp/big", "-T", str(big), "-X", "POST") == (
        "413", limit)
    with big.open("rb") as fh:  # requests sends it all before reading: the server lingers
        r = site.post("/pubapi/publish?cid=grp/big", fh)
    assert (r.status_code, r.text) == (413, limit)
    # chunked: refused while reading
    assert site.curl("/pubapi/publish?cid=grp/big", "-T", str(big), "-X", "POST",
                     "-H", "Transfer-Encoding: chunked") == ("413", limit)
    r = site.post("/pubapi/publish?cid=grp/big", (big.read_bytes()[i:i + MIB]
                                                   for i in range(0, 20 * MIB, MIB)))
    assert (r.status_code, r.text) == (413, limit)
    wait_for(site.clean, 10)
    assert site.count("publish", "413") == 4


def test_a_huge_announced_chunk_is_read_in_pieces(site):
    tls = site.connect()
    tls.sendall(b"POST /pubapi/publish?cid=grp/huge HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n100000000\r\n" + payload(9 * MIB))
    answer = read_response(tls)
    tls.close()
    assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    wait_for(site.clean, 10)


@pytest.fixture
def small_spool(tmp_path, pki):
    """A site whose spool is a 20 MiB tmpfs with an 8 MiB reserve."""
    config = ingest_config(tmp_path / "site", pki, http=False, spool_reserve_bytes=8 * MIB)
    spool = Path(config.server.spool)
    spool.mkdir(parents=True)
    root("the 507 test mounts a 20 MiB tmpfs as the spool")
    tool("mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(spool)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the 507 test: {done.stderr.strip()}")
    try:
        with running_ingest(config) as (bound, server):
            yield Site(config, bound, server, pki)
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def test_insufficient_storage(small_spool, tmp_path):
    site = small_spool
    answer = "Insufficient storage in the spool, try again later\n"
    r = site.post("/pubapi/publish?cid=grp/15m", payload(15 * MIB))
    assert (r.status_code, r.reason, r.text) == (507, "Insufficient Storage", answer)
    assert site.clean()
    r = site.post("/pubapi/publish?cid=grp/5m", payload(5 * MIB))
    assert (r.status_code, r.text) == (200, "OK\n")
    # chunked: the size is unknown up front; the disk fills up while writing
    r = site.post("/pubapi/publish?cid=grp/fill",
                  (payload(MIB) for _ in range(30)))
    assert (r.status_code, r.text) == (507, answer)
    wait_for(lambda: [p.name for p in site.spool.incoming.iterdir()] == ["grp%2F5m"]
             and list(site.spool.tmp.iterdir()) == [], 10)
