"""kill -9 at exact points of the pipeline, then restart (by hand, and under ``userpub run``).

After each crash: every entry the spool accepted (the ``OK`` of an upload) is published once,
complete; no reader ever saw a partial CID (a :class:`CidWatcher` lists every CID over and
over during the whole test); and no leftover (tmp/ entries, claimed entries, staging trees,
trash, temporary stamp files, stale locks) stays for good.

The publisher is stopped at an exact system call by strace's delay injection
(:class:`Failpoint`): no test hook in the production code. It is held with SIGSTOP while the
test queues a batch, so that one pass claims the whole batch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from janitor.daemon import state_store
from janitor.state import RunRecord
from spool import Spool
from tests.helpers import Daemon, make_tarball, run_userpub, tree_listing, wait_for, write_config
from tests.integration.test_hostile_support import (
    REPO1,
    REPO2,
    Api,
    CidWatcher,
    Failpoint,
    IngestDaemon,
    age_tmp,
    children,
    expected_listing,
    free_port,
    leftovers,
    listing,
    tune,
)
from tests.integration.test_janitor_support import DAY
from tests.integration.test_janitor_support import Site as JanitorSite
from tests.pki import TestPKI, ingest_config
from userpub.config import Config, load_config


def files_of(n: int, count: int = 60) -> dict[str, bytes]:
    """The contents of test tarball ``n``: ``count`` small files in a few directories."""
    return {f"pkg{n}/d{i % 7}/f{i:04d}.txt": b"%d:%d\n" % (n, i) * (1 + i % 50)
            for i in range(count)}


class CrashSite:
    """A configuration, its spool and repositories, and the tarballs of the test."""

    def __init__(self, directory: Path, *, durable: bool = False) -> None:
        self.dir = directory
        self.path = write_config(directory / "site")
        tune(self.path, "publisher", durable=durable, rescan_seconds=1.0)
        self.config: Config = load_config(self.path)
        self.spool = Spool(self.config.server.spool)
        self.spool.ensure_layout()
        for i in (0, 1):  # the janitor judges ages only with every repository readable
            for sub in ("sw", "ts"):
                (self.root(i) / sub).mkdir(parents=True, exist_ok=True)
        self.contents: dict[str, dict[str, bytes]] = {}
        self.logs = 0

    def root(self, index: int = 0) -> Path:
        root = self.config.repositories[index].root
        assert root is not None
        return root

    def tarball(self, cid: str, files: dict[str, bytes]) -> Path:
        self.contents[cid] = files
        return make_tarball(self.dir / f"{cid.replace('/', '_')}.tar.gz", files)

    def drop(self, cid: str, files: dict[str, bytes]) -> None:
        """Queue ``cid`` as ingest does after reading the whole upload (its OK)."""
        self.spool.drop_file(self.tarball(cid, files), cid, "tester")

    def expected(self, cid: str) -> set[str] | None:
        files = self.contents.get(cid)
        return None if files is None else expected_listing(files)

    def watcher(self) -> CidWatcher:
        return CidWatcher([self.root(0), self.root(1)], self.expected)

    def publisher(self, repo: str = REPO1) -> Daemon:
        self.logs += 1
        daemon = Daemon(self.path, "publisher", "--repo", repo,
                        log=self.dir / f"publisher{self.logs}.log")
        daemon.wait_log("publisher ready")
        return daemon

    def published(self, cid: str) -> bool:
        return any((self.root(i) / "sw" / cid / ".publisher").exists() for i in (0, 1))

    def check_published(self, cids: list[str]) -> None:
        """Each CID complete, with the tarball's bytes, in exactly one repository."""
        for cid in cids:
            where = [i for i in (0, 1) if (self.root(i) / "sw" / cid).exists()]
            assert len(where) == 1, (cid, where)
            tree = tree_listing(self.root(where[0]) / "sw" / cid)
            for name, data in self.contents[cid].items():
                assert tree[name] == data, (cid, name)
            assert set(tree) == expected_listing(self.contents[cid])

    def spool_empty(self) -> bool:
        depth = self.spool.depth()
        return depth.incoming == 0 and not any(depth.active.values())

    def clean_up_and_check(self) -> None:
        """What a crash left must go by itself: the janitor's next run empties the trash,
        and then nothing at all is left."""
        run_userpub(self.path, "janitor", "--now", "--repo", REPO1)
        run_userpub(self.path, "janitor", "--now", "--repo", REPO2)
        assert leftovers(self.config) == []


def hold(daemon: Daemon, syscall: str, when: int, queue: Callable[[], None]) -> Failpoint:
    """Stop the idle ``daemon``, arm the failpoint, ``queue`` work, let it go on."""
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        point = Failpoint(daemon.proc.pid, syscall, when)
        queue()
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    return point


def staged_trees(site: CrashSite) -> list[Path]:
    staging = site.root() / ".userpub" / "staging"
    return [tree for txn in staging.iterdir() for tree in txn.iterdir()]


def at_claimed(site: CrashSite, cids: list[str]) -> None:
    active = site.spool.active / REPO1
    assert len(os.listdir(active)) == len(cids)
    assert os.listdir(site.spool.incoming) == []
    assert staged_trees(site) == []  # nothing unpacked yet


def at_unpacking(site: CrashSite, cids: list[str]) -> None:
    [tree] = staged_trees(site)  # the first CID, partly unpacked
    got = listing(tree)
    assert 0 < len(got) < len(expected_listing(site.contents[cids[0]])) - 2, len(got)


def at_staged(site: CrashSite, cids: list[str]) -> None:
    trees = staged_trees(site)
    assert sorted(listing(t) == site.expected(c) for t, c in
                  zip(sorted(trees, key=lambda p: p.name), cids, strict=True)) == [True] * 3
    assert not any(site.published(c) for c in cids)


def at_publishing(site: CrashSite, cids: list[str]) -> None:
    assert [site.published(c) for c in cids] == [True, False, False]  # one of three renamed
    assert len(staged_trees(site)) == 2


POINTS = {
    # name: (system call, its n-th call after the batch was queued, check at that moment)
    "after claiming": ("mkdir", 1, at_claimed),  # the transaction lock's directory
    "mid-unpack": ("openat", 40, at_unpacking),
    "between staging and publishing": ("syncfs", 1, at_staged),  # durable = true
    "between two CID renames": ("renameat2", 5, at_publishing),  # 3 claims, then CID 1, 2
}


@pytest.mark.parametrize("point", list(POINTS))
def test_publisher_killed_at_a_point_then_restarted_by_hand(tmp_path: Path, point: str) -> None:
    syscall, when, check = POINTS[point]
    site = CrashSite(tmp_path, durable=syscall == "syncfs")
    cids = [f"grp/c{i}" for i in range(3)]
    with site.watcher() as watcher:
        publisher = site.publisher()
        try:
            def queue() -> None:
                for i, cid in enumerate(cids):
                    site.drop(cid, files_of(i, 200))

            with hold(publisher, syscall, when, queue) as fp:
                fp.wait_hit(60, publisher.log)
                check(site, cids)
                fp.kill()
        finally:
            publisher.kill()
            publisher.stop()
        # the claimed entries wait in active/ for the next publisher; the lock is free
        assert len(os.listdir(site.spool.active / REPO1)) == 3
        again = site.publisher()
        try:
            assert "waiting to take over" not in again.log()
            wait_for(lambda: all(map(site.published, cids)) and site.spool_empty(), 60,
                     again.log)
        finally:
            assert again.stop() == 0
        assert "returned 3 claimed entries" in again.log()
        watcher.check()
        assert watcher.seen >= set(cids)
    site.check_published(cids)
    site.clean_up_and_check()


def test_publisher_killed_mid_stamp_then_restarted(tmp_path: Path) -> None:
    site = CrashSite(tmp_path)
    cids = ["grp/s0", "grp/s1"]
    publisher = site.publisher()
    try:
        for i, cid in enumerate(cids):
            site.drop(cid, files_of(i))
        wait_for(lambda: all(map(site.published, cids)) and site.spool_empty(), 30,
                 publisher.log)
        stamps = site.root() / "ts"
        def queue() -> None:
            for cid in cids:
                site.spool.drop_stamp(cid, "user")

        with hold(publisher, "rename", 1, queue) as fp:  # the first stamp's rename into place
            fp.wait_hit(60, publisher.log)
            written = [p.name for p in (stamps / "grp").iterdir()]
            assert len(written) == 1 and written[0].endswith(".tmp"), written
            fp.kill()
    finally:
        publisher.kill()
        publisher.stop()
    again = site.publisher()
    try:
        wait_for(lambda: all((stamps / c).is_file() for c in cids) and site.spool_empty(), 30,
                 again.log)
    finally:
        again.stop()
    assert all((stamps / c).read_text() == "user\n" for c in cids)
    site.check_published(cids)
    site.clean_up_and_check()


def test_ingest_killed_mid_upload_then_restarted(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "pki")
    config = ingest_config(tmp_path / "site", pki, http=False, repos=1)
    site_dir = tmp_path / "site"
    spool = Spool(config.server.spool)
    ingest = IngestDaemon(config.path, tmp_path / "ingest1.log")
    api = Api(ingest.https, pki)
    files = files_of(1)
    tarball = make_tarball(tmp_path / "t.tar.gz", files)
    data = tarball.read_bytes()
    try:
        tls = api.connect()
        tls.sendall(b"POST /pubapi/publish?cid=grp/cut HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: %d\r\n\r\n" % (len(data) + (6 << 20)) + data
                    + bytes(3 << 20))  # more than one read of the server (1 MiB)
        def streaming() -> bool:  # the upload is being written to the spool
            return any(p.stat().st_size > 0 for p in spool.tmp.glob("*/payload"))

        wait_for(streaming, 10, ingest.log)
        ingest.kill()
        answer = b""
        try:
            while chunk := tls.recv(65536):
                answer += chunk
        except OSError:
            pass
        tls.close()
        assert b"OK" not in answer  # the client never got an OK: it must upload again
    finally:
        ingest.kill()
        ingest.stop()
    assert os.listdir(spool.incoming) == []  # nothing half-received is queued
    [leftover] = os.listdir(spool.tmp)
    assert (spool.tmp / leftover / "payload").stat().st_size > 0

    ingest = IngestDaemon(config.path, tmp_path / "ingest2.log")
    api = Api(ingest.https, pki)
    publisher = Daemon(config.path, "publisher", "--repo", REPO1, log=tmp_path / "p1.log")
    try:
        publisher.wait_log("publisher ready")
        assert leftover in os.listdir(spool.tmp)  # may be an upload in progress: kept for now
        with tarball.open("rb") as fh:  # the client's retry
            assert api.publish("grp/cut", fh).text == "OK\n"
        path = "PRESENT:/cvmfs/repo1.example.org/sw/grp/cut\n"
        wait_for(lambda: api.text("status", "grp/cut") == path, 30, publisher.log)
    finally:
        publisher.stop()
        ingest.stop()
    root = config.repositories[0].root
    assert root is not None
    assert tree_listing(root / "sw/grp/cut")["pkg1/d0/f0000.txt"] == \
        files["pkg1/d0/f0000.txt"]
    # once older than the grace period, the next start of a publisher removes it
    assert age_tmp(config, config.janitor.tmp_grace_hours * 3600 + 60) == [leftover]
    publisher = Daemon(config.path, "publisher", "--repo", REPO1, log=tmp_path / "p2.log")
    try:
        publisher.wait_log("publisher ready")
    finally:
        publisher.stop()
    assert leftovers(config) == []
    assert site_dir.is_dir()


@pytest.mark.parametrize(("point", "syscall", "when"), [
    ("mid-removal", "rename", 60),  # the 60th CID renamed into the trash
    ("mid-gc", "unlinkat", 300),  # the trash being deleted
])
def test_janitor_killed_mid_cleanup_then_restarted_by_hand(
        tmp_path: Path, point: str, syscall: str, when: int) -> None:
    site = _janitor_site(load_config(write_config(tmp_path / "site")))
    files = files_of(7, 12)
    old = [f"old/c{i:03d}" for i in range(150)]
    fresh = [f"new/c{i:03d}" for i in range(20)]
    site.publish(REPO1, old, age_days=40, files=files)
    site.publish(REPO1, fresh, age_days=1, files=files)
    want = expected_listing(files)
    with CidWatcher([site.root(REPO1)], lambda cid: want) as watcher:
        janitor = Daemon(site.path, "janitor", "--now", "--repo", REPO1,
                         log=tmp_path / "janitor1.log")
        janitor.proc.send_signal(signal.SIGSTOP)  # before it does anything: arm the point
        try:
            with Failpoint(janitor.proc.pid, syscall, when) as fp:
                janitor.proc.send_signal(signal.SIGCONT)
                fp.wait_hit(60, janitor.log)
                fp.kill()
        finally:
            janitor.kill()
            janitor.stop()
        left = site.cids(REPO1)
        assert set(fresh) <= left  # nothing in use ever goes
        if point == "mid-removal":
            assert 0 < len(left & set(old)) < len(old)
        else:
            assert not left & set(old) and not site.trash_is_empty(REPO1)
        assert "cleanup success" not in janitor.log()
        # the next run (here by hand) finishes the job: recover, remove the rest, gc
        run_userpub(site.path, "janitor", "--now", "--repo", REPO1)
        watcher.check()
    assert site.cids(REPO1) == set(fresh)
    assert site.trash_is_empty(REPO1)
    assert leftovers(site.config) == []


# -- everything at once, under the supervisor --------------------------------------------------


class Uploader(threading.Thread):
    """A user who uploads until answered OK (a refused connection or an error: try again)."""

    def __init__(self, api: Api, cid: str, tarball: Path, answers: dict[str, str]) -> None:
        super().__init__(daemon=True, name=f"upload-{cid}")
        self.api, self.cid, self.tarball, self.answers = api, cid, tarball, answers
        self.attempts = 0

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.attempts += 1
            try:
                with self.tarball.open("rb") as fh:
                    r = self.api.publish(self.cid, fh, timeout=60)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if r.status_code == 200:
                self.answers[self.cid] = r.text
                return
            time.sleep(0.2)


def child(supervisor: Daemon, name: str, timeout: float = 30) -> int:
    """The pid of the supervised child whose command line has ``name``."""
    found: list[int] = []

    def look() -> bool:
        found[:] = [pid for pid, cmd in children(supervisor.proc.pid).items() if name in cmd]
        return len(found) == 1

    wait_for(look, timeout, lambda: f"no child {name!r}: {children(supervisor.proc.pid)}")
    return found[0]


@pytest.mark.slow
def test_kill_9_of_every_daemon_under_userpub_run(tmp_path: Path) -> None:
    """Ingest killed mid-upload, the publisher killed mid-batch twice, the janitor killed
    mid-cleanup: ``userpub run`` restarts each (with backoff), and the promise holds."""
    pki = TestPKI(tmp_path / "pki")
    port = free_port()
    config = ingest_config(tmp_path / "site", pki, http=False, listen=f"127.0.0.1:{port}",
                           threads=16)
    # 600 old CIDs in repo1 and a janitor run due now (the last one was 3 days ago)
    jsite = _janitor_site(config)
    old = [f"old/c{i:04d}" for i in range(600)]
    jsite.publish(REPO1, old, age_days=40)
    store = state_store(config)
    long_ago = time.time() - 3 * DAY
    for name in (REPO1, REPO2):
        store.save(RunRecord(name, long_ago, long_ago + 60))

    contents: dict[str, dict[str, bytes]] = {}
    tarballs: dict[str, Path] = {}
    for i in range(24):
        cid = f"grp/u{i:02d}"
        contents[cid] = files_of(100 + i, 40 + 20 * (i % 5))
        tarballs[cid] = make_tarball(tmp_path / f"u{i}.tar.gz", contents[cid])
    roots = [r.root for r in config.repositories if r.root is not None]

    def expected(cid: str) -> set[str] | None:
        return expected_listing(contents[cid]) if cid in contents else None

    answers: dict[str, str] = {}
    api = Api(f"127.0.0.1:{port}", pki)
    supervisor = Daemon(config.path, "run", log=tmp_path / "run.log")
    paused = 0
    with CidWatcher(roots, expected) as watcher:
        try:
            ingest_pid = child(supervisor, " ingest")
            wait_for(api.ping, 30, supervisor.log)
            # the janitor is cleaning repo1 (its publisher waits for the lock): kill it
            wait_for(lambda: supervisor.log().count(" removed old/") >= 20, 60, supervisor.log)
            os.kill(child(supervisor, " janitor"), signal.SIGKILL)
            # repo1's publisher pauses: the uploads are repo2's publisher's to take
            paused = child(supervisor, f"--repo {REPO1}")
            os.kill(paused, signal.SIGSTOP)
            # uploads begin; the ingest server dies in the middle of them
            uploaders = [Uploader(api, cid, tarballs[cid], answers) for cid in tarballs]
            for up in uploaders[:12]:
                up.start()
            wait_for(lambda: len(answers) >= 3, 60, supervisor.log)
            os.kill(ingest_pid, signal.SIGKILL)
            for up in uploaders[12:]:
                up.start()
            # the publisher of repo2 dies while unpacking a batch (a transaction's staging
            # directory is named after its process), and again as soon as it is back
            staging = config.repositories[1].root / ".userpub/staging"  # type: ignore[operator]
            kill_while_unpacking(supervisor, staging, REPO2)
            wait_for(lambda: supervisor.log().count(f"{REPO2}: publisher ready") == 2, 30,
                     supervisor.log)
            os.kill(child(supervisor, f"--repo {REPO2}"), signal.SIGKILL)
            os.kill(paused, signal.SIGCONT)
            for up in uploaders:
                up.join(150)
            assert sorted(answers) == sorted(tarballs), supervisor.log()[-3000:]
            # OK, or PRESENT for a retry of an upload whose OK was lost with its connection
            assert all(a == "OK\n" or a.startswith("PRESENT:") for a in answers.values())
            # every upload answered OK gets published
            present = {cid: f"PRESENT:/cvmfs/{{}}/sw/{cid}\n" for cid in tarballs}

            def all_published() -> bool:
                return all(api.text("status", cid) in (present[cid].format(REPO1),
                                                       present[cid].format(REPO2))
                           for cid in tarballs)

            wait_for(all_published, 120, lambda: supervisor.log()[-3000:])
            wait_for(lambda: "cleanup success" in supervisor.log(), 120, supervisor.log)
        finally:
            if paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(paused, signal.SIGCONT)
            code = supervisor.stop(timeout=120)
        watcher.check()
    log = supervisor.log()
    assert code == 0, log[-3000:]
    assert log.count("killed by signal 9; restarting") >= 4, log[-3000:]
    assert f"publisher:{REPO2} (pid" in log and "restarting in 2 s" in log  # backoff grows
    assert "ingest (pid" in log and "janitor (pid" in log
    for cid in tarballs:
        root = [r for r in roots if (r / "sw" / cid).exists()]
        assert len(root) == 1 and listing(root[0] / "sw" / cid) == expected(cid)
    assert jsite.cids(REPO1).isdisjoint(old)  # the interrupted cleanup was finished
    # the uploads (and stamps) cut by the kill of ingest wait in tmp/ until they are older
    # than the grace period (they could be in progress in another ingest server); then they go
    cut = age_tmp(config, config.janitor.tmp_grace_hours * 3600 + 60)
    assert all((config.server.spool / "tmp" / n).is_dir() for n in cut), cut
    run_userpub(config.path, "janitor", "--now")
    assert leftovers(config) == []
    assert children(os.getpid()) == {} or all("userpub" not in c
                                              for c in children(os.getpid()).values())


def kill_while_unpacking(supervisor: Daemon, staging: Path, repo: str) -> None:
    """kill -9 the supervised publisher of ``repo`` once its transaction (named after its
    process) holds a CID being unpacked; wait until it is gone."""
    pid = child(supervisor, f"--repo {repo}")
    wait_for(lambda: any(staging.glob(f"*.P{pid}Q*/*")), 60, supervisor.log)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in children(supervisor.proc.pid), 10)


def _janitor_site(config: Config) -> JanitorSite:
    """The janitor tests' Site over an existing configuration file (it rewrites none)."""
    site = JanitorSite.__new__(JanitorSite)
    site.directory = config.path.parent
    site.path = config.path
    site.config = config
    for repo in config.repositories:
        assert repo.root is not None
        for sub in ("sw", "ts", ".userpub/staging", ".userpub/trash"):
            (repo.root / sub).mkdir(parents=True, exist_ok=True)
    site.spool = Spool(config.server.spool)
    site.spool.ensure_layout()
    site._tarballs = {}
    return site
