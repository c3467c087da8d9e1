"""Issue 15's acceptance: two complete sites on loopback, each `userpub run`, lose one.

Site A (pubA) publishes repo1 and repo2, site B (pubB) repo3 and repo4, all cvmfs-native;
each keeps replicas of the other's, made and refreshed by its own replicator (master keys
pinned over the peer channel). One scenario, in order:

1. publishes through both servers; cross-server ``exists``; one CID sent to both at once is
   published in exactly one repository;
2. ``kill -9`` of every process of site A while it publishes: B keeps accepting and answers
   ``exists`` for all four repositories within 30 s; when A returns, every upload answered
   ``OK`` is PRESENT;
3. A stopped: B's replicas go stale and B's janitor removes nothing (while a fresh replica
   lets the same plan remove); A's repo1 wiped and restored from B's replica: same revision
   and CIDs (genuine ``cvmfs_swissknife check`` when the tools are present); publishing
   resumes at the next revision.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from publisher.repositories import open_reader
from publisher.repositories.cvmfs_native import NativeReader
from publisher.repositories.replicas import replica_freshness
from spool import Spool
from tests.cvmfs_genuine import genuine_check
from tests.helpers import Daemon, run_userpub, tar_body, wait_for
from tests.pair import HOSTED, REPOS, PairSites, Site
from userpub.config import Config

pytestmark = pytest.mark.timeout(600)

MAX_AGE = 10.0  # [pair] replica_max_age_seconds of both sites (the smallest allowed)


def cid_of(body: bytes) -> str:
    return "grp/" + hashlib.sha256(body).hexdigest()


class Sites:
    """The pair, with the HTTP calls a client makes and the processes of each site."""

    def __init__(self, directory: Path) -> None:
        self.pair = PairSites(directory, extra={"server": {"replica_interval": 1.0},
                                                "pair": {"timeout": 2.0,
                                                         "replica_max_age_seconds": MAX_AGE}})
        self.runs: dict[str, Daemon] = {}
        self.directory = directory

    def __getitem__(self, name: str) -> Site:
        return self.pair[name]

    def config(self, name: str) -> Config:
        config = self.pair[name].config
        assert config is not None
        return config

    def start(self, name: str) -> None:
        site = self.pair[name]
        self.runs[name] = Daemon(self.config(name).path, "run",
                                 log=self.directory / f"{name}.log")
        wait_for(lambda: self.ping(site) == "OK", 120,
                 lambda: f"{name} not ready\n{self.runs[name].log()[-3000:]}", interval=0.2)

    def stop(self, name: str) -> None:
        assert self.runs.pop(name).stop(120) == 0

    def kill_all(self, name: str) -> int:
        """kill -9 of every process of the site (the supervisor and each daemon it started,
        each in its own session); the number killed."""
        marker = str(self.config(name).path).encode()
        victims = [pid for pid in _pids() if marker in _cmdline(pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(marker in _cmdline(p) for p in victims), 30)
        self.runs.pop(name).proc.wait(10)
        return len(victims)

    def ping(self, site: Site) -> str:
        try:
            return requests.get(f"http://127.0.0.1:{site.http}/pubapi/ping", timeout=5).text.strip()
        except requests.RequestException:
            return ""

    def call(self, site: Site, route: str, cid: str, body: bytes | None = None) -> tuple[int, str]:
        pki = self.pair.pki
        url = f"{site.base}/pubapi/{route}"
        kwargs = {"params": {"cid": cid}, "cert": pki.cert("proxy"), "verify": str(pki.ca_file),
                  "timeout": 120}
        r = (requests.post(url, data=body, **kwargs) if body is not None
             else requests.get(url, **kwargs))
        return r.status_code, r.text.strip()

    def present(self, site: Site, cid: str) -> bool:
        try:
            return self.call(site, "exists", cid)[1].startswith("PRESENT:")
        except requests.RequestException:
            return False

    def holders(self, cid: str) -> list[str]:
        """The repositories (read at their stratum 0s) that hold ``cid``."""
        found = []
        for owner, repos in HOSTED.items():
            config = self.config(owner)
            found += [r for r in repos if open_reader(config, config.repository(r)).contains(cid)]
        return found

    def revision(self, name: str, repo: str) -> int:
        reader = open_reader(self.config(name), self.config(name).repository(repo))
        assert isinstance(reader, NativeReader)
        manifest = reader.manifest()
        return manifest.revision if manifest is not None else 0


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def seed(sites: Sites) -> dict[str, str]:
    """Keys, and one CID published in each of the four repositories (before the sites run)."""
    cids = {}
    for owner, repos in HOSTED.items():
        config = sites.config(owner)
        for repo in repos:
            run_userpub(config.path, "keys", "init", repo)
            tarball = sites.directory / f"seed-{repo}.tar"
            tarball.write_bytes(tar_body(50_000, seed=10 + REPOS.index(repo)))
            cid = cid_of(tarball.read_bytes())
            run_userpub(config.path, "drop", str(tarball), "--cid", cid)
            run_userpub(config.path, "publisher", "--repo", repo, "--once", timeout=300)
            cids[repo] = cid
    return cids


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    made = Sites(tmp_path)
    try:
        yield made
    finally:
        for name in list(made.runs):
            made.kill_all(name)


def test_two_sites_survive_the_loss_of_one(sites: Sites, tmp_path: Path) -> None:
    a, b = sites["pubA"], sites["pubB"]
    seeded = seed(sites)
    sites.start("pubA")
    sites.start("pubB")

    # -- 1. both publish; each answers for the other's repositories ---------------------------
    for repo, cid in seeded.items():
        for site in (a, b):
            assert sites.call(site, "exists", cid)[1] == f"PRESENT:/cvmfs/{repo}/sw/{cid}"
    uploads = {}
    for site, n in ((a, 1), (b, 2)):
        body = tar_body(100_000, seed=n)
        assert sites.call(site, "publish", cid_of(body), body) == (200, "OK")
        uploads[cid_of(body)] = site
    for cid in uploads:
        wait_for(lambda cid=cid: sites.present(a, cid) and sites.present(b, cid), 120,
                 f"{cid} not PRESENT on both servers")

    both = tar_body(2_000_000, seed=3)
    answers: list[tuple[int, str]] = []
    threads = [threading.Thread(target=lambda s=s: answers.append(
        sites.call(s, "publish", cid_of(both), both))) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [(200, "OK"), (200, "OK")]
    wait_for(lambda: sites.present(a, cid_of(both)) and sites.present(b, cid_of(both)), 120)
    time.sleep(2 * 1.0)  # two more rescans: a second publication would show by now
    assert len(sites.holders(cid_of(both))) == 1, sites.holders(cid_of(both))

    # B's replicas hold everything A published (the kill below must not lose the answer)
    published_on_a = [c for c in [*seeded.values(), *uploads, cid_of(both)]
                      if any(r in HOSTED["pubA"] for r in sites.holders(c))]
    b_config = sites.config("pubB")

    def b_replicas_have_everything() -> bool:
        readers = [open_reader(b_config, b_config.repository(r)) for r in HOSTED["pubA"]]
        return all(any(rd.contains(c) for rd in readers) for c in published_on_a)

    wait_for(b_replicas_have_everything, 60, "B's replicas did not catch up", interval=0.2)

    # -- 2. kill -9 of all of site A while it publishes ---------------------------------------
    spool_a = Spool(sites.config("pubA").server.spool)
    answered_ok: list[str] = []
    stop_sending = threading.Event()

    def send_to_a() -> None:
        n = 100
        while not stop_sending.is_set():
            body = tar_body(3_000_000, seed=n)
            n += 1
            try:
                if sites.call(a, "publish", cid_of(body), body) == (200, "OK"):
                    answered_ok.append(cid_of(body))
            except requests.RequestException:
                return

    sender = threading.Thread(target=send_to_a)
    sender.start()

    def a_is_publishing() -> bool:
        return len(answered_ok) >= 3 and any(
            any(d.iterdir()) for d in spool_a.active.iterdir() if d.is_dir())

    wait_for(a_is_publishing, 120, "A never published", interval=0.005)
    killed_at = time.monotonic()
    assert sites.kill_all("pubA") >= 5  # supervisor, ingest, 2 publishers, janitor, replicator
    stop_sending.set()
    sender.join(60)

    body = tar_body(100_000, seed=4)
    assert sites.call(b, "publish", cid_of(body), body) == (200, "OK")  # B keeps accepting
    answered_ok.append(cid_of(body))
    for repo, cid in seeded.items():
        wait_for(lambda cid=cid: sites.present(b, cid), 30 - (time.monotonic() - killed_at),
                 f"B does not answer for {repo} within 30 s of the kill")
    assert time.monotonic() - killed_at < 30
    for cid in published_on_a:
        assert sites.present(b, cid)

    sites.start("pubA")
    for cid in answered_ok:
        wait_for(lambda cid=cid: sites.present(a, cid) and sites.present(b, cid), 180,
                 f"{cid}, answered OK, is not PRESENT after A returned")
        assert len(sites.holders(cid)) == 1

    # -- 3. stale replicas stop the janitor; restore a lost repository -----------------------
    def b_has_a_revisions() -> bool:
        return all((f := replica_freshness(b_config, r)) is not None
                   and f[0] == sites.revision("pubA", r) for r in HOSTED["pubA"])

    wait_for(lambda: not any(spool_a.incoming.iterdir()), 120)
    wait_for(b_has_a_revisions, 60, "B's replicas did not reach A's revisions", interval=0.2)
    future = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 60 * 86400))
    fresh = run_userpub(b_config.path, "janitor", "--dry-run", "--repo", "repo3.example.org",
                        "--as-of", future, check=False)
    assert fresh.returncode == 0 and seeded["repo3.example.org"] in fresh.stdout, fresh.stdout

    revisions = {r: sites.revision("pubA", r) for r in HOSTED["pubA"]}
    listing = sorted(open_reader(sites.config("pubA"),
                                 sites.config("pubA").repository("repo1.example.org")).cids())
    sites.stop("pubA")
    wait_for(lambda: (f := replica_freshness(b_config, "repo1.example.org")) is not None
             and f[1] > MAX_AGE, 60, interval=0.2)
    stale = run_userpub(b_config.path, "janitor", "--dry-run", "--repo", "repo3.example.org",
                        "--as-of", future, check=False)
    assert stale.returncode != 0 and "replica repo1.example.org" in stale.stderr, stale
    now = run_userpub(b_config.path, "janitor", "--now", "--repo", "repo3.example.org",
                      check=False)
    assert now.returncode == 1 and "removing nothing until it is fresh" in now.stderr, now
    assert sites.present(b, seeded["repo3.example.org"])
    status = run_userpub(b_config.path, "status").stdout
    assert "repo1.example.org: published by pubA (cvmfs-native); replica at revision " \
        f"{revisions['repo1.example.org']}" in status and "STALE" in status, status

    sites.pair.wipe("pubA", "repo1.example.org")
    restored = run_userpub(sites.config("pubA").path, "restore", "--from", "pubB",
                           "repo1.example.org", timeout=300)
    assert f"revision {revisions['repo1.example.org']}" in restored.stdout, restored.stdout
    assert sites.revision("pubA", "repo1.example.org") == revisions["repo1.example.org"]
    reader = open_reader(sites.config("pubA"),
                         sites.config("pubA").repository("repo1.example.org"))
    assert sorted(reader.cids()) == listing

    tarball = tmp_path / "after-restore.tar"
    tarball.write_bytes(tar_body(60_000, seed=5))
    run_userpub(sites.config("pubA").path, "drop", str(tarball), "--cid",
                cid_of(tarball.read_bytes()))
    run_userpub(sites.config("pubA").path, "publisher", "--repo", "repo1.example.org", "--once",
                timeout=300)
    assert sites.revision("pubA", "repo1.example.org") == revisions["repo1.example.org"] + 1
    assert set(sites.holders(cid_of(tarball.read_bytes()))) == {"repo1.example.org"}
    # last: without the genuine tools the test skips here, everything else checked
    genuine_check(a.root("repo1.example.org"), tmp_path / "check")
