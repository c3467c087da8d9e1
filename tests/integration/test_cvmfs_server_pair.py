"""``userpub initrepos`` for a pair of cvmfs-server hosts, against two cvmfs_server doubles.

Site A hosts repo1, site B keeps a stratum-1 replica of it: initrepos makes the repository
with the user-code settings and its .cvmfsdirtab on A, the replica (add-replica, a first
snapshot) on B, and does nothing more when run again; a snapshot brings B the revision A
published since.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cvmfs_server_double import CvmfsServerDouble, mounts_available
from tests.helpers import REPO_ROOT

REPO = "repo1.example.org"
STRATUM0 = "http://127.0.0.1:8000/cvmfs"


@pytest.fixture
def doubles(tmp_path):
    why = mounts_available()
    if why is not None:
        pytest.skip(why)
    made = {name: CvmfsServerDouble(tmp_path / name / "double") for name in ("pubA", "pubB")}
    try:
        yield made
    finally:
        for double in made.values():
            double.repos.append(REPO)
            double.destroy()


def site(tmp_path, name: str, double: CvmfsServerDouble) -> str:
    directory = tmp_path / name
    where = (f'root = "{double.root}/var/spool/cvmfs/{REPO}/rdonly"\n'
             f'mount = "{double.root}/cvmfs/{REPO}"' if name == "pubA"
             else f'replica = "{double.root}/srv/cvmfs/{REPO}"\nmount = "/cvmfs/{REPO}"')
    (directory / "userpub.toml").write_text(f"""
[server]
name = "{name}"
spool = "spool"
state = "state"

[[peer]]
name = "pubA"
url = "https://127.0.0.1:8443"
stratum0 = "{STRATUM0}"

[[peer]]
name = "pubB"
url = "https://127.0.0.1:9443"
stratum0 = "http://127.0.0.1:9000/cvmfs"

[[repository]]
name = "{REPO}"
host = "pubA"
backend = "cvmfs-server"
{where}
""")
    return str(directory / "userpub.toml")


def initrepos(config: str, double: CvmfsServerDouble, peers: str, keys) -> subprocess.CompletedProcess[str]:
    env = double.env()
    env["CVMFS_SERVER_DOUBLE_PEERS"] = peers
    return subprocess.run(
        [sys.executable, "-m", "userpub", "--config", config, "initrepos",
         "--etc", str(double.root / "etc/cvmfs"), "--srv", str(double.root / "srv/cvmfs"),
         "--keys", str(keys)], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=120, check=False)


def pair_of(tmp_path, a: CvmfsServerDouble, b: CvmfsServerDouble) -> tuple[str, str, str, Path]:
    """Both sites' configurations, the doubles' peer map and a key directory with the
    origin's master public key."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / f"{REPO}.pub").write_text("-----BEGIN PUBLIC KEY-----\n(test)\n")
    return site(tmp_path, "pubA", a), site(tmp_path, "pubB", b), f"{STRATUM0}={a.root}", keys


def test_initrepos_makes_the_repository_and_its_replica_once(tmp_path, doubles):
    a, b = doubles["pubA"], doubles["pubB"]
    config_a, config_b, peers, keys = pair_of(tmp_path, a, b)

    made = initrepos(config_a, a, peers, keys)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"created {REPO}")
    conf = (a.root / f"etc/cvmfs/repositories.d/{REPO}/server.conf").read_text()
    for setting in ("CVMFS_REPOSITORY_TTL=15", 'CVMFS_AUTO_TAG_TIMESPAN="1 day ago"',
                    "CVMFS_AUTO_GC=false", "CVMFS_GARBAGE_COLLECTION=true",
                    "CVMFS_ENFORCE_LIMITS=true", "CVMFS_AUTOCATALOGS=true"):
        assert setting in conf.splitlines()
    assert (a.published(REPO) / ".cvmfsdirtab").read_text() == "/*\n/sw/*\n/ts/*\n"
    assert (a.root / f"srv/cvmfs/{REPO}/.cvmfs_master_replica").is_file()
    assert a.revision(REPO) == 1

    replica = initrepos(config_b, b, peers, keys)
    assert replica.returncode == 0, replica.stderr
    assert replica.stdout == f"replica of {REPO} from {STRATUM0}/{REPO}\n"
    assert (b.root / f"srv/cvmfs/{REPO}/revisions/1/.cvmfsdirtab").is_file()
    conf_b = (b.root / f"etc/cvmfs/repositories.d/{REPO}/replica.conf").read_text()
    assert f"CVMFS_STRATUM0={STRATUM0}/{REPO}" in conf_b

    for config, double in ((config_a, a), (config_b, b)):  # again: nothing to do
        again = initrepos(config, double, peers, keys)
        assert (again.returncode, again.stdout) == (0, ""), again.stderr
    calls = [c for c, _ in b.commands()]
    assert calls.count(f"add-replica -o root {STRATUM0}/{REPO} {keys}/{REPO}.pub") == 1


def test_a_replica_needs_its_origins_key(tmp_path, doubles):
    a, b = doubles["pubA"], doubles["pubB"]
    config_b = site(tmp_path, "pubB", b)
    refused = initrepos(config_b, b, f"{STRATUM0}={a.root}", tmp_path / "nokeys")
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        f"fatal: repository {REPO}: its master public key {tmp_path}/nokeys/{REPO}.pub is "
        "missing (copy it from pubA)")


def test_the_replicator_snapshots_cvmfs_server_replicas(tmp_path, doubles):
    """After initrepos, `userpub replicator` refreshes B's replica with cvmfs_server snapshot
    and records its revision and freshness (status, metrics, the janitor's guard)."""
    a, b = doubles["pubA"], doubles["pubB"]
    config_a, config_b, peers, keys = pair_of(tmp_path, a, b)
    assert initrepos(config_a, a, peers, keys).returncode == 0
    assert initrepos(config_b, b, peers, keys).returncode == 0
    env = a.env()
    for command in (["transaction", REPO], ["publish", REPO]):  # A publishes revision 2
        subprocess.run(["cvmfs_server", *command], env=env, check=True, capture_output=True,
                       timeout=60)
    assert a.revision(REPO) == 2

    def replicator(*args: str) -> subprocess.CompletedProcess[str]:
        env_b = b.env()
        env_b["CVMFS_SERVER_DOUBLE_PEERS"] = peers
        return subprocess.run([sys.executable, "-m", "userpub", "--config", config_b,
                               "replicator", "--once", *args], capture_output=True, text=True,
                              env=env_b, cwd=REPO_ROOT, timeout=120, check=False)

    done = replicator()
    assert done.returncode == 0, done.stderr
    assert f"{REPO}: snapshot brought the replica to revision 2" in done.stderr
    status = subprocess.run([sys.executable, "-m", "userpub", "--config", config_b, "status"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                            check=True).stdout
    assert status.startswith(f"{REPO}: published by pubA (cvmfs-server); replica at "
                             "revision 2, pulled "), status
    b.fail("snapshot", stderr="Failed to contact stratum 0 (test)")
    failed = replicator()
    assert failed.returncode == 1 and "snapshot failed" in failed.stderr, failed.stderr
