"""The real clients' request sequences against the real service (ingest + publishers).

* justIN's ``justin-cvmfs-upload``: a bearer token, ``https://host//pubapi/...`` (a double
  slash), ``cid=dune/<sha1 of the tarball>``, its User-Agent and Accept headers, urllib with a
  CA directory, an uncompressed tarball; exists, publish, then exists every few seconds.
* the same with curl and an X.509 proxy, double slashes included;
* jobsub_lite's ``lib/tarfiles.py``: python-requests with the proxy, the CID percent-encoded
  whole (``dune%2F<sha256>``), exists, publish, exists until PRESENT, then update;
* two users and one CID: nobody can publish other content under someone else's hash, and
  ``group_publishers`` keeps a group to its own.
"""

from __future__ import annotations

import hashlib
import io
import os
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import requests

from tests.helpers import Daemon, wait_for
from tests.pki import TestPKI, TokenIssuerServer, ingest_config, running_ingest

AUD = "https://pub1.example.org"
REPOS = ("repo1.example.org", "repo2.example.org")
pytestmark = pytest.mark.timeout(240)


def plain_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tarball, as justIN's users make them (``tar cvf``)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def issuers(pki):
    with TokenIssuerServer(pki) as server:
        server.issuer("good")
        yield server


class Site:
    def __init__(self, config, port: int, pki: TestPKI) -> None:
        self.config, self.port, self.pki = config, port, pki
        self.host = f"127.0.0.1:{port}"

    def root(self, path: str) -> Path:
        """The local directory of a published /cvmfs/<repo>/... path."""
        repo, _, rest = path.removeprefix("/cvmfs/").partition("/")
        root = self.config.repository(repo).root
        assert root is not None
        return root / rest


@pytest.fixture
def site(tmp_path, pki, issuers, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    config = ingest_config(tmp_path / "site", pki, http=False,
                           token_issuers=[issuers.issuers["good"].issuer],
                           token_audiences=[AUD],
                           group_publishers={"closed": ["jane"]})
    publishers = [Daemon(config.path, "publisher", "--repo", repo, log=tmp_path / f"{repo}.log")
                  for repo in REPOS]
    try:
        for daemon in publishers:
            daemon.wait_log("publisher ready")
        with running_ingest(config) as (bound, _):
            yield Site(config, bound.https[1], pki)
    finally:
        for daemon in publishers:
            daemon.stop()


# -- justIN -----------------------------------------------------------------------------------


def justin_request(site: Site, token: str, url: str, method: str, data: bytes | None):
    """One request exactly as justin-cvmfs-upload makes it (urllib, its headers)."""
    request = urllib.request.Request(url, data=data, method=method, headers={
        "User-Agent": "justin-cvmfs-upload 00.00.00", "Accept": "application/json",
        "Authorization": "Bearer " + token})
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(capath=str(site.pki.ca_dir))
    try:
        return urllib.request.urlopen(request, context=context, timeout=60)
    except urllib.error.URLError:
        return None


def justin_upload(site: Site, token: str, tarball: bytes) -> tuple[int, str]:
    """justin-cvmfs-upload's algorithm: (its exit code, what it prints)."""
    digest = hashlib.sha1(tarball).hexdigest()

    def path() -> str | None:
        response = justin_request(site, token, f"https://{site.host}//pubapi/exists?cid=dune/"
                                  f"{digest}", "GET", None)
        text = response.read().decode() if response else ""
        return text[8:] if text.startswith("PRESENT:") else None

    if (found := path()) is not None:
        return 0, found
    response = justin_request(site, token, f"https://{site.host}//pubapi/publish?cid=dune/"
                              f"{digest}", "POST", tarball)
    if not response or response.status != 200 or response.read().decode()[:2] != "OK":
        return 3, "Failed to upload"
    for _ in range(36):
        time.sleep(0.5)  # justIN sleeps 5 s; the loop is the same
        if (found := path()) is not None:
            return 0, found
    return 4, "cvmfs directory not available despite upload"


def test_justin_upload_flow_ends_present_with_a_usable_path(site, issuers):
    token = issuers.issuers["good"].token(audience=AUD)
    tarball = plain_tar({"hello_world.txt": b"Thu Dec  3 12:00:00 UTC 2026\n",
                         "env/bin/python": b"#!/bin/sh\n"})
    code, printed = justin_upload(site, token, tarball)
    digest = hashlib.sha1(tarball).hexdigest()
    assert code == 0, printed
    assert printed.strip().endswith(f"/sw/dune/{digest}")
    assert (site.root(printed.strip()) / "hello_world.txt").read_bytes() == \
        b"Thu Dec  3 12:00:00 UTC 2026\n"
    # run again (justIN's advice before each workflow): found at once, nothing uploaded
    assert justin_upload(site, token, tarball) == (0, printed)


def test_the_same_flow_with_curl_and_a_proxy(site, tmp_path):
    tarball = tmp_path / "code.tar"
    tarball.write_bytes(plain_tar({"run.sh": b"#!/bin/sh\necho curl\n"}))
    cid = "dune/" + hashlib.sha1(tarball.read_bytes()).hexdigest()
    proxy = str(site.pki["proxy"])

    def curl(*args: str) -> str:
        return subprocess.run(["curl", "-sS", "--cert", proxy, "--key", proxy, "--capath",
                               str(site.pki.ca_dir), *args], capture_output=True, text=True,
                              timeout=120, check=True).stdout

    assert curl(f"https://{site.host}//pubapi/exists?cid={cid}") == "MISSING\n"
    assert curl("-T", str(tarball), "-X", "POST",
                f"https://{site.host}//pubapi/publish?cid={cid}") == "OK\n"
    wait_for(lambda: curl(f"https://{site.host}//pubapi//exists/?cid={cid}").startswith(
        "PRESENT:"), 60)
    path = curl(f"https://{site.host}//pubapi/exists?cid={cid}").removeprefix("PRESENT:").strip()
    assert (site.root(path) / "run.sh").read_bytes() == b"#!/bin/sh\necho curl\n"


# -- jobsub_lite ------------------------------------------------------------------------------


def test_jobsub_request_sequence_ends_present_and_updated(site, tmp_path):
    tarball = plain_tar({"setup.sh": b"export X=1\n"})
    cid = "fermilab/" + hashlib.sha256(tarball).hexdigest()
    quoted = urllib.parse.quote(cid, safe="")  # as jobsub does: fermilab%2F<sha256>
    base = f"https://{site.host}/pubapi"
    auth = {"cert": site.pki.cert("proxy"), "verify": str(site.pki.ca_dir), "timeout": 60}
    assert requests.get(f"{base}/exists?cid={quoted}", **auth).text == "MISSING\n"
    r = requests.post(f"{base}/publish?cid={quoted}", data=io.BytesIO(tarball), **auth)
    assert (r.status_code, r.text) == (200, "OK\n")
    answer: list[str] = []

    def present() -> bool:
        answer[:] = [requests.get(f"{base}/exists?cid={quoted}", **auth).text]
        return answer[0].startswith("PRESENT:")

    wait_for(present, 60, lambda: str(answer))
    path = answer[0].removeprefix("PRESENT:").strip()
    assert path.endswith(f"/sw/{cid}")
    assert (site.root(path) / "setup.sh").read_bytes() == b"export X=1\n"
    assert requests.get(f"{base}/update?cid={quoted}", **auth).text == answer[0]


# -- squatting --------------------------------------------------------------------------------


def test_nobody_publishes_under_someone_elses_hash(site, issuers):
    good = issuers.issuers["good"]
    jane, john = good.token(audience=AUD), good.token({"sub": "john"}, audience=AUD)
    janes = plain_tar({"jane.sh": b"echo jane\n"})
    johns = plain_tar({"john.sh": b"echo john, pretending\n"})
    cid = "dune/" + hashlib.sha256(janes).hexdigest()
    headers = {"verify": str(site.pki.ca_file), "timeout": 60}
    url = f"https://{site.host}/pubapi/publish?cid={cid}"

    squat = requests.post(url, data=johns, headers={"Authorization": f"Bearer {john}"}, **headers)
    assert squat.status_code == 400
    assert squat.text == (f"Bad request: cid names sha256 {hashlib.sha256(janes).hexdigest()} "
                          f"but the tarball's sha256 is {hashlib.sha256(johns).hexdigest()}\n")
    assert not any(site.config.server.spool.joinpath("incoming").iterdir())
    ok = requests.post(url, data=janes, headers={"Authorization": f"Bearer {jane}"}, **headers)
    assert (ok.status_code, ok.text) == (200, "OK\n")
    # a group with named publishers is closed to the others
    closed = "closed/" + hashlib.sha256(johns).hexdigest()
    refused = requests.post(f"https://{site.host}/pubapi/publish?cid={closed}", data=johns,
                            headers={"Authorization": f"Bearer {john}"}, **headers)
    assert (refused.status_code, refused.text) == \
        (403, f"john@{good.issuer} may not publish in group closed\n")
    allowed = requests.post(f"https://{site.host}/pubapi/publish?cid={closed}", data=johns,
                            headers={"Authorization": f"Bearer {jane}"}, **headers)
    assert (allowed.status_code, allowed.text) == (200, "OK\n")


def test_an_operators_drop_under_a_wrong_hash_fails_with_both_hashes(site, tmp_path):
    data = plain_tar({"x": b"y"})
    cid = "ops/" + "a" * 64
    incoming = site.config.server.spool / "incoming"
    (incoming / ".drop.part").write_bytes(data)
    os.rename(incoming / ".drop.part", incoming / "ops%2F" f"{'a' * 64}.tar")
    auth = {"cert": site.pki.cert("proxy"), "verify": str(site.pki.ca_file), "timeout": 60}
    answer: list[str] = []

    def failed() -> bool:
        answer[:] = [requests.get(f"https://{site.host}/pubapi/status?cid={cid}", **auth).text]
        return answer[0].startswith("FAILED:")

    wait_for(failed, 60, lambda: str(answer))
    assert answer[0] == (f"FAILED:cid names sha256 {'a' * 64} but the tarball's sha256 is "
                         f"{hashlib.sha256(data).hexdigest()}\n")
