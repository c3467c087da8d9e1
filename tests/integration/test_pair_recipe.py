"""The operations guide's recipe for clients that do not fail over (jobsub's exists, justIN):
one name in front of the pair, HAProxy passing TLS through and checking ``/pubapi/ping``.

With one server killed, jobsub's request sequence against that one name still succeeds at
once: the health check takes the dead server out (no 9-minute stall on its exists).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.parse

import pytest
import requests

from tests.helpers import Daemon, run_userpub, wait_for
from tests.pair import HOSTED, PairSites, free_port
from tests.pki import IngestProcess

HAPROXY_BINARY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(HAPROXY_BINARY is None, reason="haproxy is not installed "
                                 "(apt-get install haproxy): the recipe's proxy")]

HAPROXY = """\
global
    maxconn 256
defaults
    mode tcp
    option redispatch
    retries 3
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend rcds
    bind 127.0.0.1:{port}
    default_backend userpub
backend userpub
    option httpchk GET /pubapi/ping
    http-check expect string OK
{servers}
"""


def plain_tar(text: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("setup.sh")
        info.size, info.mtime = len(text), 1_700_000_000
        tar.addfile(info, io.BytesIO(text))
    return out.getvalue()


def jobsub(base: str, pki, tarball: bytes) -> str:
    """jobsub_lite's sequence: exists, publish, exists until PRESENT, update; the path."""
    cid = urllib.parse.quote("fermilab/" + hashlib.sha256(tarball).hexdigest(), safe="")
    auth = {"cert": pki.cert("proxy"), "verify": str(pki.ca_file), "timeout": 60}
    assert requests.get(f"{base}/pubapi/exists?cid={cid}", **auth).text == "MISSING\n"
    r = requests.post(f"{base}/pubapi/publish?cid={cid}", data=tarball, **auth)
    assert (r.status_code, r.text) == (200, "OK\n")
    seen: list[str] = []

    def present() -> bool:
        seen[:] = [requests.get(f"{base}/pubapi/exists?cid={cid}", **auth).text]
        return seen[0].startswith("PRESENT:")

    wait_for(present, 60, lambda: str(seen))
    assert requests.get(f"{base}/pubapi/update?cid={cid}", **auth).text == seen[0]
    return seen[0]


def test_jobsub_through_one_checked_name_survives_the_loss_of_a_server(tmp_path):
    sites = PairSites(tmp_path)
    processes = {}
    publishers = []
    for name, site in sites.sites.items():
        assert site.config is not None
        for repo in HOSTED[name]:
            run_userpub(site.config.path, "keys", "init", repo)
            publishers.append(Daemon(site.config.path, "publisher", "--repo", repo,
                                     log=tmp_path / f"{repo}.log"))
        processes[name] = IngestProcess(site.config, tmp_path / f"{name}-ingest.log")
    port = free_port()
    servers = "\n".join(f"    server {s.name} 127.0.0.1:{s.https} check port {s.http} "
                        "inter 300ms fall 1 rise 1" for s in sites.sites.values())
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY.format(port=port, servers=servers))
    assert HAPROXY_BINARY is not None
    haproxy = subprocess.Popen([HAPROXY_BINARY, "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    base = f"https://127.0.0.1:{port}"
    try:
        for daemon in publishers:
            daemon.wait_log("publisher ready")
        wait_for(lambda: _answers(base, sites.pki), 30)
        first = jobsub(base, sites.pki, plain_tar(b"export RUN=1\n"))
        assert first.startswith("PRESENT:/cvmfs/repo")
        # server A dies: every process of it
        processes["pubA"].proc.send_signal(signal.SIGKILL)
        processes["pubA"].proc.wait(30)
        for daemon in publishers[:2]:
            daemon.kill()
        started = time.monotonic()
        second = jobsub(base, sites.pki, plain_tar(b"export RUN=2\n"))
        assert second.startswith(("PRESENT:/cvmfs/repo3", "PRESENT:/cvmfs/repo4"))
        assert time.monotonic() - started < 60  # not jobsub's 20 x 30 s on a dead server
    finally:
        haproxy.send_signal(signal.SIGTERM)
        haproxy.wait(30)
        for daemon in publishers:
            daemon.stop()
        for process in processes.values():
            process.stop()


def _answers(base: str, pki) -> bool:
    try:
        return requests.get(f"{base}/pubapi/ping", verify=str(pki.ca_file), timeout=5).text \
            == "OK\n"
    except requests.RequestException:
        return False
