"""The client as a grid user installs it: its own wheel, alone, in a fresh venv of the oldest
Python available (>= 3.9), publishing against the real ingest and publishers.

Nothing else is installed in that venv (no dependency, and ``--no-index`` proves none is
needed); the venv's interpreter never sees the server's packages.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, Daemon, make_tarball
from tests.pki import TestPKI, ingest_config, running_ingest

REPOS = ("repo1.example.org", "repo2.example.org")
pytestmark = pytest.mark.timeout(300)


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = out.split()
    return int(major), int(minor)


def oldest_python() -> tuple[str, tuple[int, int]]:
    """The oldest Python >= 3.9 on this machine: PATH, then pyenv's versions; else this one."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(9, 15)]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += [str(p) for p in sorted(pyenv.glob("3.*/bin/python3"))]
    found = []
    for python in filter(None, candidates):
        version = _version(python)
        if version is not None and version >= (3, 9):
            found.append((version, python))
    if not found:
        return sys.executable, sys.version_info[:2]
    version, python = min(found)
    return python, version


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    """A venv of the oldest Python with only the client's wheel installed."""
    work = tmp_path_factory.mktemp("client")
    wheels = work / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "-w", str(wheels), str(REPO_ROOT / "userpub_client")],
                           capture_output=True, text=True, timeout=240, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("cvmfs_userpub_client-*.whl")
    python, version = oldest_python()
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=240)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--no-index", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=240, check=False)
    assert install.returncode == 0, install.stdout + install.stderr
    return venv, version


def test_the_wheel_holds_the_client_only_and_declares_no_dependency(client_venv):
    venv, version = client_venv
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list",
                             "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "cvmfs-userpub-client" in names
    assert names - {"cvmfs-userpub-client", "pip", "setuptools", "wheel"} == set(), names
    meta = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import importlib.metadata as m; "
                           "print(m.requires('cvmfs-userpub-client'))"],
                          capture_output=True, text=True, check=True)
    assert meta.stdout.strip() == "None"
    server_side = subprocess.run([str(venv / "bin" / "python"), "-c", "import userpub.config"],
                                 capture_output=True, text=True, check=False, cwd="/")
    assert server_side.returncode != 0  # the server's packages are not in the client's venv
    print(f"client venv on Python {version[0]}.{version[1]}")


@pytest.fixture
def site(tmp_path):
    pki = TestPKI(tmp_path / "pki")
    config = ingest_config(tmp_path / "site", pki, http=False)
    publishers = [Daemon(config.path, "publisher", "--repo", repo, log=tmp_path / f"{repo}.log")
                  for repo in REPOS]
    try:
        for daemon in publishers:
            daemon.wait_log("publisher ready")
        with running_ingest(config) as (bound, _server):
            yield config, pki, f"127.0.0.1:{bound.https[1]}"
    finally:
        for daemon in publishers:
            daemon.stop()


def test_publish_exists_and_wait_from_the_standalone_client(client_venv, site, tmp_path):
    venv, _ = client_venv
    config, pki, server = site
    tarball = make_tarball(tmp_path / "code.tar.gz", {"bin/run.sh": b"#!/bin/sh\necho hi\n"})
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path),
           "X509_CERT_DIR": str(pki.ca_dir), "X509_USER_PROXY": str(pki["proxy"]),
           "USERPUB_SERVERS": server}

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "userpub-client"), *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=180, check=False)

    published = client("publish", str(tarball), "--group", "alone")
    assert published.returncode == 0, published.stderr
    path = published.stdout.strip()
    assert re.fullmatch(rf"/cvmfs/repo[12]\.example\.org/sw/alone/{digest}", path), path
    repo = next(r for r in config.repositories if path.startswith(f"/cvmfs/{r.name}/"))
    assert repo.root is not None
    assert (repo.root / "sw" / "alone" / digest / "bin" / "run.sh").read_bytes() == \
        b"#!/bin/sh\necho hi\n"

    exists = client("exists", f"alone/{digest}")
    assert (exists.returncode, exists.stdout.strip()) == (0, path), exists.stderr
    assert client("cid", str(tarball), "-G", "alone").stdout.strip() == f"alone/{digest}"
    mount_root = tmp_path / "cvmfs"
    mount_root.mkdir()
    (mount_root / repo.name).symlink_to(repo.root)
    waited = client("wait", f"alone/{digest}", "--repos", ",".join(REPOS), "--mount-root",
                    str(mount_root), "--timeout", "30", "--interval", "0.2")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == str(mount_root / repo.name / "sw" / "alone" / digest)
