"""ingest/stratum0.py: a stratum 0 served over real HTTP, read back by `userpub verify`/`cat`.

``serve_stratum0`` (a real cheroot server on 127.0.0.1) is shared with the integration tests.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests
from cheroot import wsgi

from ingest.stratum0 import LONG_SECONDS, SHORT_SECONDS, make_stratum0_app, stratum0_repositories
from publisher.repositories.cvmfs_native import NativeRepository, init_keys
from publisher.tarball import UnpackLimits
from tests.helpers import REPO_ROOT, make_tarball
from tests.unit.test_cvmfs_native_invariants import check_repository, userpub_verify

FQRN = "repo.example.org"


@contextlib.contextmanager
def serve_stratum0(repositories: dict[str, Path]) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` serving ``/cvmfs/<fqrn>/...`` until the block ends."""
    server = wsgi.Server(("127.0.0.1", 0), make_stratum0_app(repositories), numthreads=4)
    server.prepare()
    thread = threading.Thread(target=server.serve, name="stratum0-test")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.bind_addr[1]}"
    finally:
        server.stop()
        thread.join(10)


def userpub(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run ``userpub`` (no configuration needed for verify/ls/cat)."""
    return subprocess.run([sys.executable, "-m", "userpub", *args], capture_output=True,
                          check=check, timeout=120, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s0")
    keys = init_keys(tmp / "keys", FQRN)
    repo = NativeRepository(FQRN, tmp / "srv" / FQRN, "sw", "ts", f"/cvmfs/{FQRN}", keys=keys,
                            durable=False)
    repo.recover()
    files = {"bin/run.sh": b"#!/bin/sh\necho hi\n", "lib/data.bin": bytes(range(256)) * 400,
             "empty": b""}
    with repo.transaction() as txn:
        txn.add("grp/abc", make_tarball(tmp / "a.tgz", files), "alice", UnpackLimits())
    return repo, files


def test_headers_caching_and_refusals(published):
    repo, _ = published
    with serve_stratum0({FQRN: repo.root}) as base:
        url = f"{base}/cvmfs/{FQRN}"
        manifest = requests.get(f"{url}/.cvmfspublished", timeout=10)
        assert manifest.status_code == 200
        assert manifest.content == (repo.root / ".cvmfspublished").read_bytes()
        assert manifest.headers["Content-Type"] == "application/x-cvmfs"
        assert manifest.headers["Cache-Control"] == f"public, max-age={SHORT_SECONDS}"
        assert "Last-Modified" not in manifest.headers and "ETag" not in manifest.headers
        expires = parsedate_to_datetime(manifest.headers["Expires"])
        date = parsedate_to_datetime(manifest.headers["Date"])
        assert 55 <= (expires - date).total_seconds() <= 65
        root_hash = manifest.content.split(b"\n")[0][1:].decode()
        obj = f"data/{root_hash[:2]}/{root_hash[2:]}C"
        catalog = requests.get(f"{url}/{obj}", timeout=10)
        assert catalog.content == (repo.root / obj).read_bytes()
        assert catalog.headers["Content-Type"] == "application/octet-stream"
        assert catalog.headers["Cache-Control"] == f"public, max-age={LONG_SECONDS}"
        assert "Content-Encoding" not in catalog.headers
        head = requests.head(f"{url}/{obj}", timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["Content-Length"]) == len(catalog.content)
        for name in (".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_master_replica"):
            assert requests.get(f"{url}/{name}", timeout=10).status_code == 200
        for bad in (".userpub/lock", ".userpub/current/.cvmfspublished", "data/txn/x", "data",
                    "data/00", "../../etc/passwd", "%2e%2e/keys", f"data/{root_hash[:2]}/x",
                    f"data/{root_hash[:2]}/{root_hash[2:]}Z"):
            answer = requests.get(f"{url}/{bad}", timeout=10)
            assert answer.status_code == 404, bad
            assert answer.headers["Cache-Control"] == "no-store"
        missing = "data/00/" + "0" * 38
        assert requests.get(f"{url}/{missing}", timeout=10).status_code == 404
        assert requests.get(f"{base}/cvmfs/other.org/.cvmfspublished", timeout=10
                            ).status_code == 404
        post = requests.post(f"{url}/.cvmfspublished", timeout=10)
        assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD"
        info = requests.get(f"{base}/cvmfs/info/v1/repositories.json", timeout=10).json()
        assert info["repositories"] == [{"name": FQRN, "url": f"/cvmfs/{FQRN}"}]
        assert info["schema"] == 1 and info["replicas"] == []
        for key in ("cvmfs_version", "os_id", "os_version_id", "os_pretty_name"):
            assert isinstance(info[key], str), key  # what cvmfs-server-scraper requires
        assert requests.get(f"{url}/.cvmfs_status.json", timeout=10).json() == {}
        assert requests.get(f"{base}/cvmfs/info/v1/meta.json", timeout=10).json()["schema"] == 1


def test_userpub_verify_ls_and_cat_over_http(published):
    repo, files = published
    key = str(repo.key_files.master_public)
    with serve_stratum0({FQRN: repo.root}) as base:
        url = f"{base}/cvmfs/{FQRN}"
        out = userpub("verify", url, "--key", key, "--repo", FQRN).stdout.decode()
        assert out.startswith("ok: ")
        listing = userpub("ls", url, "/sw/grp/abc", "--key", key).stdout.decode().split()
        assert sorted(listing) == [".cvmfscatalog", ".publisher", "bin", "empty", "lib"]
        for name, data in files.items():
            assert userpub("cat", url, f"/sw/grp/abc/{name}", "--key", key).stdout == data
        assert userpub("cat", url, "/sw/grp/abc/.publisher", "--key", key).stdout == b"alice\n"


def test_mounted_below_cvmfs_with_script_name(published):
    repo, _ = published
    app = make_stratum0_app({FQRN: repo.root})
    answers = []
    body = app({"REQUEST_METHOD": "GET", "SCRIPT_NAME": "/cvmfs",
                "PATH_INFO": f"/{FQRN}/.cvmfswhitelist"},
               lambda status, headers: answers.append(status))
    try:
        assert answers == ["200 OK"]
        assert b"".join(body) == (repo.root / ".cvmfswhitelist").read_bytes()
    finally:
        getattr(body, "close", lambda: None)()


def test_repositories_of_a_configuration(tmp_path):
    from tests.helpers import write_config
    from userpub.config import load_config

    config = load_config(write_config(tmp_path, repos=2, backend="cvmfs-native",
                                      hosts={1: "elsewhere"}))
    assert stratum0_repositories(config) == {"repo1.example.org": tmp_path / "repos" / "repo1"}


def test_objects_stay_readable_while_publishing(published, tmp_path):
    repo, _ = published
    with serve_stratum0({FQRN: repo.root}) as base:
        for i in range(3):
            with repo.transaction() as txn:
                txn.add(f"more/{i}", make_tarball(tmp_path / f"{i}.tgz", {"f": b"x" * i}),
                        "me", UnpackLimits())
            out = userpub("verify", f"{base}/cvmfs/{FQRN}", "--key",
                          str(repo.key_files.master_public)).stdout.decode()
            assert f"revision {repo.manifest().revision}:" in out
    check_repository(repo.root)
    userpub_verify(repo.root, repo.key_files.master_public)
