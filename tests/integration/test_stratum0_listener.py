"""The ingest's plain-HTTP listener serves the cvmfs-native repositories hosted here."""

from __future__ import annotations

import json
import urllib.request

from tests.helpers import make_tarball, publishers_alive, run_userpub, write_config
from tests.pki import IngestProcess, TestPKI
from userpub.config import load_config

REPO = "repo1.example.org"


def test_plain_listener_serves_the_stratum0_that_verifies(tmp_path):
    pki = TestPKI(tmp_path / "pki")
    ingest = {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0",
              "certificate": str(pki.host_cert), "key": str(pki.host_key),
              "ca_dir": str(pki.ca_dir), "grid_mapfile": str(pki.gridmap),
              "spool_reserve_bytes": 0}
    extra = "[ingest]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ingest.items())
    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native", extra=extra)
    config = load_config(path)
    run_userpub(path, "keys", "init", REPO)
    run_userpub(path, "drop", str(make_tarball(tmp_path / "t.tar.gz", {"bin/x": b"hello\n"})),
                "--cid", "grp/one")
    run_userpub(path, "publisher", "--repo", REPO, "--once", timeout=300)
    server = IngestProcess(config, tmp_path / "ingest.log")
    try:
        base = f"http://{server.http}"
        with urllib.request.urlopen(f"{base}/cvmfs/{REPO}/.cvmfspublished", timeout=10) as r:
            assert r.status == 200 and int(r.headers["Cache-Control"].split("=")[-1]) <= 61
        with publishers_alive(config), \
                urllib.request.urlopen(f"{base}/pubapi/ping", timeout=10) as r:
            assert r.read() == b"OK\n"  # the API routes are still there
        key = str(config.server.state / "keys" / f"{REPO}.pub")
        url = f"{base}/cvmfs/{REPO}"
        verified = run_userpub(path, "verify", url, "--key", key, "--repo", REPO, check=False)
        assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified
        cat = run_userpub(path, "cat", url, "/sw/grp/one/bin/x", "--key", key)
        assert cat.stdout == "hello\n"
    finally:
        assert server.stop() == 0
