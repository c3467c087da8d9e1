"""The real ingest server (cheroot, TLS, grid proxies) with the clients jobsub_lite uses.

Clients: python-requests with ``cert=(proxy, proxy)`` and ``data=<open file>``, and curl
with ``-T file -X POST --cert p --key p --cacert ca``. Servers listen on ephemeral ports.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import requests

from devsite.pki import make_proxy
from spool import Spool
from tests.helpers import publishers_alive, tar_body, wait_for
from tests.pki import STRANGER_DN, TestPKI, ingest_config, running_ingest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed (Debian package curl: "
                                       "make system-deps)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


class Site:
    """A running server and the ways to call it."""

    def __init__(self, config, bound, server, pki: TestPKI) -> None:
        self.config, self.bound, self.server, self.pki = config, bound, server, pki
        self.base = f"https://127.0.0.1:{bound.https[1]}"
        self.plain = f"http://127.0.0.1:{bound.http[1]}" if bound.http else None
        self.spool = Spool(config.server.spool)

    def get(self, path, cred: str | None = "proxy", **kw):
        cert = self.pki.cert(cred) if cred else None
        kw.setdefault("timeout", 30)
        return requests.get(self.base + path, cert=cert, verify=str(self.pki.ca_file), **kw)

    def post(self, path, data, cred: str | None = "proxy", **kw):
        cert = self.pki.cert(cred) if cred else None
        return requests.post(self.base + path, data=data, cert=cert,
                             verify=str(self.pki.ca_file), timeout=60, **kw)

    def curl(self, tmp_path: Path, path: str, *args: str, cred: str | None = "proxy"):
        """(HTTP status, body bytes, headers text, curl's return code)."""
        body, head = tmp_path / "curl.body", tmp_path / "curl.head"
        creds = ["--cert", str(self.pki[cred]), "--key", str(self.pki[cred])] if cred else []
        out = subprocess.run(["curl", "-sS", "-o", str(body), "-D", str(head), "-w",
                              "%{http_code}", "--cacert", str(self.pki.ca_file), *creds, *args,
                              self.base + path], capture_output=True, text=True, timeout=60,
                             check=False)
        return (out.stdout, body.read_bytes() if body.exists() else b"",
                head.read_text() if head.exists() else "", out.returncode)

    def sample(self, name, **labels):
        return self.server.registry.get_sample_value(name, labels) or 0.0

    def incoming(self):
        return sorted(p.name for p in self.spool.incoming.iterdir())


@pytest.fixture
def site(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki)
    with publishers_alive(config), running_ingest(config) as (bound, server):
        yield Site(config, bound, server, pki)


def publish_tree(config, cid, repo=0):
    (config.repositories[repo].root / "sw" / cid).mkdir(parents=True)


def test_every_route_with_requests_as_jobsub_calls_it(site, tmp_path):
    tarball = tmp_path / "code.tar.gz"
    tarball.write_bytes(tar_body(300_002))
    r = site.get("/pubapi/config", cred=None)
    assert (r.status_code, r.text) == (200, "repos:repo1.example.org,repo2.example.org\n")
    assert site.get("/pubapi/ping", cred=None).text == "OK\n"
    assert site.get("/pubapi/exists?cid=grp/sha1").text == "MISSING\n"
    with tarball.open("rb") as fh:
        r = site.post("/pubapi/publish?cid=grp/sha1", fh)
    assert (r.status_code, r.text) == (200, "OK\n")
    assert r.headers["Content-Type"] == "text/plain"
    assert site.get("/pubapi/status?cid=grp/sha1").text == "QUEUED\n"
    entry = site.spool.read_entry(site.spool.incoming / "grp%2Fsha1")
    assert entry.payload.read_bytes() == tarball.read_bytes()
    assert entry.submitter.startswith("janedoe (/DC=org/DC=example/OU=People/CN=Jane Doe")
    publish_tree(site.config, "grp/sha2", repo=1)
    present = "PRESENT:/cvmfs/repo2.example.org/sw/grp/sha2\n"
    assert site.get("/pubapi/exists?cid=grp/sha2").text == present
    assert site.get("/pubapi/update?cid=grp/sha2").text == present
    assert site.get("/pubapi/status?cid=grp/sha2").text == present
    assert site.incoming() == ["grp%2Fsha1", "grp%2Fsha2@stamp"]
    assert site.sample("userpub_http_requests_total", route="publish", status="200") == 1
    assert site.sample("userpub_upload_bytes_total") == 300_002


def test_every_route_with_curl(site, tmp_path):
    tarball = tmp_path / "code.tar.gz"
    tarball.write_bytes(tar_body(3_000_000))  # over 1 MiB: curl sends Expect: 100-continue
    assert site.curl(tmp_path, "/pubapi/ping", cred=None)[:2] == ("200", b"OK\n")
    assert site.curl(tmp_path, "/pubapi/config")[:2] == (
        "200", b"repos:repo1.example.org,repo2.example.org\n")
    assert site.curl(tmp_path, "/pubapi/exists?cid=grp/c1")[:2] == ("200", b"MISSING\n")
    code, body, head, _ = site.curl(tmp_path, "/pubapi/publish?cid=grp/c1", "-T", str(tarball),
                                    "-X", "POST")
    assert (code, body) == ("200", b"OK\n")
    assert head.startswith("HTTP/1.1 100 Continue")
    assert site.curl(tmp_path, "/pubapi/status?cid=grp/c1")[:2] == ("200", b"QUEUED\n")
    publish_tree(site.config, "grp/c2")
    present = b"PRESENT:/cvmfs/repo1.example.org/sw/grp/c2\n"
    assert site.curl(tmp_path, "/pubapi/update?cid=grp/c2")[:2] == ("200", present)
    code, body, _, _ = site.curl(tmp_path, "/pubapi/publish?cid=grp/c2", "-T", str(tarball),
                                 "-X", "POST")
    assert (code, body) == ("200", present)
    assert site.curl(tmp_path, "/pubapi/nothing")[:2] == ("404", b"Unrecognized api\n")
    code, _, head, _ = site.curl(tmp_path, "/pubapi/publish?cid=x")
    assert code == "405" and "Allow: POST" in head
    entry = site.spool.read_entry(site.spool.incoming / "grp%2Fc1")
    assert entry.payload.read_bytes() == tarball.read_bytes()


def test_plain_listener_serves_ping_config_and_metrics_only(site):
    assert requests.get(site.plain + "/pubapi/ping", timeout=10).text == "OK\n"
    assert requests.get(site.plain + "/pubapi/config", timeout=10).text.startswith("repos:")
    metrics = requests.get(site.plain + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "userpub_uploads_in_progress 0.0" in metrics.text
    for path in ("/pubapi/exists?cid=a", "/pubapi/status?cid=a", "/pubapi/update?cid=a"):
        assert requests.get(site.plain + path, timeout=10).status_code == 404
    assert requests.post(site.plain + "/pubapi/publish?cid=a", data=b"x",
                         timeout=10).status_code == 404
    assert site.get("/metrics").status_code == 404  # and no metrics over HTTPS


@pytest.mark.parametrize(("cred", "status", "body"), [
    ("proxy", 200, "MISSING\n"),
    ("proxy2", 200, "MISSING\n"),          # proxy of a proxy
    ("usercert", 200, "MISSING\n"),        # a plain user certificate
    ("stranger", 403, "Unrecognized DN\n"),
    ("limited", 403, "Limited proxies are not accepted\n"),
    ("limited_child", 403, "Limited proxies are not accepted\n"),
    (None, 403, "Token or client cert required\n"),
])
def test_identities(site, cred, status, body):
    r = site.get("/pubapi/exists?cid=grp/x", cred=cred)
    assert (r.status_code, r.reason, r.text) == (
        status, "OK" if status == 200 else "Access denied", body)


def test_limited_proxies_accepted_when_configured(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki, allow_limited_proxies=True, http=False)
    with running_ingest(config) as (bound, server):
        site = Site(config, bound, server, pki)
        assert site.get("/pubapi/exists?cid=a", cred="limited").text == "MISSING\n"
        assert site.get("/pubapi/exists?cid=a", cred="limited_child").text == "MISSING\n"


@pytest.mark.parametrize("cred", ["expired", "untrusted", "forged"])
def test_bad_certificates_fail_the_handshake(site, tmp_path, cred):
    with pytest.raises(requests.exceptions.RequestException):
        site.get("/pubapi/exists?cid=a", cred=cred)
    code, _, _, rc = site.curl(tmp_path, "/pubapi/exists?cid=a", cred=cred)
    assert rc != 0 and code == "000"
    wait_for(lambda: site.sample("userpub_auth_failures_total", reason="bad_certificate") >= 2)
    assert site.get("/pubapi/exists?cid=a").text == "MISSING\n"  # the server is fine


def test_gridmap_changes_apply_without_restart(site):
    assert site.get("/pubapi/exists?cid=a", cred="stranger").status_code == 403
    with site.pki.gridmap.open("a") as fh:
        fh.write(f'"{STRANGER_DN}" stranger\n')
    try:
        assert site.get("/pubapi/exists?cid=a", cred="stranger").text == "MISSING\n"
    finally:
        site.pki.gridmap.write_text(site.pki.gridmap.read_text().replace(
            f'"{STRANGER_DN}" stranger\n', ""))


def test_revocation_applies_once_the_context_is_rebuilt(tmp_path):
    pki = TestPKI(tmp_path / "pki")  # a CA of its own: its user gets revoked
    config = ingest_config(tmp_path / "site", pki, crl_check=True, http=False)
    with running_ingest(config) as (bound, server):
        site = Site(config, bound, server, pki)
        assert site.get("/pubapi/exists?cid=a", cred="proxy2").text == "MISSING\n"
        pki.ca.revoke(pki.user.cert)
        pki.ca.write_crl(pki.ca_dir)
        # A running context never sees the new CRL ...
        assert site.get("/pubapi/exists?cid=a", cred="proxy").status_code == 200
        server.reload_tls()
        # ... a rebuilt one does: proxies of the revoked user fail the handshake.
        with pytest.raises(requests.exceptions.RequestException):
            site.get("/pubapi/exists?cid=a", cred="proxy")
        other = make_proxy(pki.stranger).write(tmp_path / "stranger2.pem")
        r = requests.get(site.base + "/pubapi/exists?cid=a", cert=(str(other), str(other)),
                         verify=str(pki.ca_file), timeout=10)
        assert r.status_code == 403 and r.text == "Unrecognized DN\n"  # not revoked: it got in


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_session_resumption_never_loses_the_identity(site, version):
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_file))
    ctx.load_cert_chain(site.pki["proxy"])
    ctx.maximum_version = version
    session = None
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", site.bound.https[1])) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /pubapi/exists?cid=a HTTP/1.1\r\nHost: x\r\nConnection: close"
                        b"\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\nMISSING\n")
            session = tls.session


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_below_1_2_is_refused(site):
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", site.bound.https[1])) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_a_silent_client_does_not_block_the_others(site):
    with socket.create_connection(("127.0.0.1", site.bound.https[1])):
        # connected, no ClientHello: the handshake waits in a worker, not in the acceptor
        r = site.get("/pubapi/exists?cid=a", timeout=5)
        assert r.text == "MISSING\n"


def test_refused_curl_upload_sends_no_body(site, tmp_path, caplog):
    caplog.set_level(logging.INFO, "userpub.ingest.access")
    tarball = tmp_path / "big.tar"
    tarball.write_bytes(tar_body(20_000_000))
    code, body, head, _ = site.curl(tmp_path, "/pubapi/publish?cid=grp/x", "-T", str(tarball),
                                    "-X", "POST", cred="stranger")
    assert (code, body) == ("403", b"Unrecognized DN\n")
    assert "100 Continue" not in head and "Connection: close" in head
    assert site.sample("userpub_uploads_in_progress") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "userpub.ingest.access"]
    assert any(f"refused unknown_dn: {STRANGER_DN}" in line and "bytes=0 " in line
               for line in lines)


def test_requests_client_sees_the_403_of_a_refused_upload(site, tmp_path):
    tarball = tmp_path / "big.tar"
    tarball.write_bytes(tar_body(20_000_000))
    with tarball.open("rb") as fh:
        r = site.post("/pubapi/publish?cid=grp/x", fh, cred="stranger")
    assert (r.status_code, r.text) == (403, "Unrecognized DN\n")
    assert site.incoming() == [] and list(site.spool.tmp.iterdir()) == []
