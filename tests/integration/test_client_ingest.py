"""``userpub client`` (a real subprocess) against the real ingest server and real publishers.

A proxy publish with one dead server in the list, the same tarball again (exists -> update,
no upload), a token publish, a tarball the publisher rejects (FAILED with the reason), a
stranger's proxy (403), and ``userpub wait`` finding the published CID.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, Daemon, make_tarball
from tests.pki import TestPKI, TokenIssuerServer, ingest_config, running_ingest
from userpub_client.reproducible_tar import make_tarball as reproducible_tarball

AUD = "https://pub1.example.org"
REPOS = ("repo1.example.org", "repo2.example.org")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def issuers(pki):
    with TokenIssuerServer(pki) as server:
        server.issuer("good")
        yield server


def dead_server() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Site:
    """ingest in this process, one publisher per repository, and a /cvmfs-like mount root."""

    def __init__(self, config, bound, tmp_path: Path, pki: TestPKI) -> None:
        self.config, self.pki, self.tmp = config, pki, tmp_path
        self.server = f"127.0.0.1:{bound.https[1]}"
        self.mount_root = tmp_path / "cvmfs"
        self.mount_root.mkdir()
        for repo in config.repositories:
            (self.mount_root / repo.name).symlink_to(repo.root)

    def env(self, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items()
                if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
        return {**keep, "XDG_RUNTIME_DIR": str(self.tmp), "X509_CERT_DIR": str(self.pki.ca_dir),
                "USERPUB_SERVERS": f"{dead_server()},{self.server}", **extra}

    def userpub(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "userpub", *args], capture_output=True,
                              text=True, timeout=120, cwd=REPO_ROOT, env=self.env(**env),
                              check=False)

    def local(self, cvmfs_path: str) -> Path:
        """The local directory of a /cvmfs/<repo>/... path the server reported."""
        return self.mount_root / cvmfs_path.removeprefix("/cvmfs/")


@pytest.fixture
def site(tmp_path, pki, issuers, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # the ingest trusts the issuer
    config = ingest_config(tmp_path / "site", pki, http=False,
                           token_issuers=[issuers.issuers["good"].issuer], token_audiences=[AUD])
    publishers = [Daemon(config.path, "publisher", "--repo", repo, log=tmp_path / f"{repo}.log")
                  for repo in REPOS]
    try:
        for daemon in publishers:
            daemon.wait_log("publisher ready")
        with running_ingest(config) as (bound, _server):
            yield Site(config, bound, tmp_path, pki)
    finally:
        for daemon in publishers:
            daemon.stop()


def test_publish_with_a_proxy_then_again_then_wait(site, tmp_path):
    tree = tmp_path / "code"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "bin" / "run.sh").chmod(0o755)
    tarball = reproducible_tarball(tree, tmp_path / "code.tar.gz").path
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    proxy = str(site.pki["proxy"])

    first = site.userpub("client", "publish", str(tarball), "--group", "fermilab",
                         X509_USER_PROXY=proxy)
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip()
    assert path.startswith("/cvmfs/repo") and path.endswith(f"/sw/fermilab/{digest}")
    assert (site.local(path) / "bin" / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert "X.509 proxy" in first.stderr

    started = time.monotonic()
    again = site.userpub("client", "publish", str(tarball), "-G", "fermilab",
                         X509_USER_PROXY=proxy)
    assert (again.returncode, again.stdout.strip()) == (0, path), again.stderr
    assert "already published" in again.stderr
    assert "uploading" not in again.stderr
    assert time.monotonic() - started < 30

    cid = site.userpub("cid", str(tarball), "-G", "fermilab").stdout.strip()
    assert cid == f"fermilab/{digest}"
    status = site.userpub("client", "status", cid, X509_USER_PROXY=proxy)
    assert (status.returncode, status.stdout) == (0, f"PRESENT:{path}\n")
    repos = site.userpub("client", "config", X509_USER_PROXY=proxy).stdout.strip()
    assert repos == ",".join(REPOS)
    found = site.userpub("wait", cid, "--repos", repos, "--mount-root", str(site.mount_root),
                         "--timeout", "10", "--interval", "1")
    assert (found.returncode, found.stdout.strip()) == (0, str(site.local(path))), found.stderr
    shell = subprocess.run(["sh", str(REPO_ROOT / "scripts" / "userpub-wait.sh"), cid,
                            "--repos", repos, "--mount-root", str(site.mount_root),
                            "--timeout", "5"], capture_output=True, text=True, timeout=30,
                           check=False)
    assert (shell.returncode, shell.stdout.strip()) == (0, str(site.local(path)))


def test_publish_with_a_token(site, tmp_path, issuers):
    token_file = tmp_path / "bt"
    token_file.write_text(issuers.issuers["good"].token(audience=AUD) + "\n")
    tarball = make_tarball(tmp_path / "t.tar.gz", {"README": b"token upload\n"})
    done = site.userpub("client", "publish", str(tarball), "--cid", "dune/token-test",
                        BEARER_TOKEN_FILE=str(token_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("/sw/dune/token-test")
    assert f"bearer token from $BEARER_TOKEN_FILE ({token_file})" in done.stderr
    assert (site.local(done.stdout.strip()) / "README").read_bytes() == b"token upload\n"


def test_a_rejected_tarball_fails_with_the_reason(site, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))  # gzip magic, garbage after
    done = site.userpub("client", "publish", str(junk), "--cid", "grp/junk",
                        X509_USER_PROXY=str(site.pki["proxy"]))
    assert done.returncode == 4, done.stderr  # refused by the upload itself, with the reason
    assert "corrupt gzip stream" in done.stderr
    status = site.userpub("client", "status", "grp/junk", X509_USER_PROXY=str(site.pki["proxy"]))
    assert (status.returncode, status.stdout) == (3, "MISSING\n")


def test_a_stranger_is_refused_before_uploading(site, tmp_path):
    tarball = make_tarball(tmp_path / "t.tar.gz", {"x": b"y"})
    done = site.userpub("client", "publish", str(tarball), "--cid", "grp/stranger",
                        X509_USER_PROXY=str(site.pki["stranger"]))
    assert done.returncode == 4, done.stderr
    assert "answered 403: Unrecognized DN" in done.stderr  # the server's one-line reason
    assert "uploading" not in done.stderr


def test_missing_and_unreachable(site):
    proxy = str(site.pki["proxy"])
    missing = site.userpub("client", "exists", "grp/nothing", X509_USER_PROXY=proxy)
    assert (missing.returncode, missing.stdout) == (3, "")
    down = site.userpub("client", "ping", "--retries", "1", "--retry-delay", "0",
                        USERPUB_SERVERS=dead_server())
    assert down.returncode == 5
    assert "after 2 attempts" in down.stderr


def test_too_large_is_refused_before_the_upload(tmp_path, pki):
    """ingest answers 413 before ``100 Continue``: the client reports it, sends no body."""
    config = ingest_config(tmp_path / "small", pki, http=False, max_upload_bytes=100_000)
    big = tmp_path / "big.tar"
    with big.open("wb") as f:
        f.write(b"\0" * 257 + b"ustar")
        f.truncate(64 << 20)
    with running_ingest(config) as (bound, server):
        site = Site(config, bound, tmp_path, pki)
        started = time.monotonic()
        done = site.userpub("client", "publish", str(big), "--cid", "grp/big",
                            "--progress", "always", X509_USER_PROXY=str(pki["proxy"]))
        elapsed = time.monotonic() - started
        received = server.registry.get_sample_value("userpub_upload_bytes_total") or 0.0
    assert done.returncode == 4, done.stderr
    assert "answered 413: Upload too large: the limit is 100000 bytes" in done.stderr
    assert "uploading" in done.stderr
    assert "\r[" not in done.stderr  # the progress bar never started: no body was sent
    assert received == 0
    assert elapsed < 30
