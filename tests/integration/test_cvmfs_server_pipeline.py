"""The publisher pipeline with ``backend = "cvmfs-server"``: real publisher processes driving
the cvmfs_server double.

The backend-agnostic pipeline tests of ``test_publisher.py`` run again here unchanged: this
module's ``site`` fixture overrides theirs with cvmfs-server repositories, whose ``root`` is
the read-only view of the published revision (so ``cid_dir()`` finds published CIDs). Three
tests look into the local backend's staging directory and two read the log the moment a CID
is visible (a publisher logs "published" only after ``cvmfs_server publish`` returns, a few
tens of milliseconds later here); their cvmfs-server versions follow, then the failure paths
of cvmfs_server as the publisher daemon lives them.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time

import pytest

from janitor.cleanup import clean
from publisher.repositories import open_repository
from publisher.tarball import UnpackLimits
from spool import Spool
from tests.helpers import make_tarball, run_userpub, tree_listing, wait_for, write_config
from tests.integration import test_publisher as local
from userpub.config import load_config

REPO1, REPO2 = local.REPO1, local.REPO2

# the local backend's pipeline tests, re-run with this module's ``site``
test_drop_default_cid_is_sha256_and_operator_rename = \
    local.test_drop_default_cid_is_sha256_and_operator_rename
test_already_published_cid_is_stamped_not_unpacked = \
    local.test_already_published_cid_is_stamped_not_unpacked

cid_dir, start_publisher, big_tarball = local.cid_dir, local.start_publisher, local.big_tarball


def make_site(tmp_path, double, *, publisher="", repo_extra=""):
    path = write_config(tmp_path / "site", backend="cvmfs-server", repo_extra=repo_extra)
    if publisher:
        path.write_text(path.read_text().replace("[publisher]\n", f"[publisher]\n{publisher}\n"))
    for repo in (REPO1, REPO2):
        double.mkfs(repo)
    return path, load_config(path)


@pytest.fixture
def site(tmp_path, cvmfs_double):
    return make_site(tmp_path, cvmfs_double)


def drop(path, tmp_path, cid, files=None):
    tarball = make_tarball(tmp_path / f"{cid.replace('/', '_')}.tar.gz",
                           files or {"bin/run": b"#!/bin/sh\n", "id": cid.encode()})
    run_userpub(path, "drop", str(tarball), "--cid", cid)


def once(path, repo=REPO1):
    """One pass of a real publisher process; its log is the result's stderr."""
    return run_userpub(path, "publisher", "--repo", repo, "--once")


def failed_reasons(config):
    return {json.loads((d / "reason.json").read_text())["cid"]:
            json.loads((d / "reason.json").read_text())["error"]
            for d in (config.server.spool / "failed").iterdir() if d.is_dir()}


def commands(double, repo=REPO1):
    return [c for c, _ in double.commands(repo) if not c.startswith("mkfs")]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


# -- cvmfs-server versions of the local backend's tests that do not fit it as written -------

def test_second_publisher_waits_then_takes_over(site, tmp_path):
    """As in test_publisher.py, waiting for "published a1" (logged after publish returns)."""
    path, config = site
    first = start_publisher(path, REPO1, tmp_path, "first")
    first.wait_log("publisher ready")
    second = start_publisher(path, REPO1, tmp_path, "second")
    try:
        second.wait_log("another publisher holds")
        tarball = make_tarball(tmp_path / "a.tar.gz", {"f": b"1"})
        run_userpub(path, "drop", str(tarball), "--cid", "a1")
        wait_for(cid_dir(config, 0, "a1").is_dir, 30)
        first.wait_log("published a1", timeout=15)
        assert "published a1" not in second.log()
        first.kill()
        second.wait_log("publisher ready", timeout=30)
        assert "aborted a transaction left open" not in second.log()  # first was idle
        run_userpub(path, "drop", str(make_tarball(tmp_path / "b.tar.gz", {"f": b"2"})),
                    "--cid", "a2")
        wait_for(cid_dir(config, 0, "a2").is_dir, 30, second.log)
    finally:
        first.kill()
        second.stop()


def test_two_publishers_200_drops_each_published_exactly_once(site, tmp_path):
    """As in test_publisher.py, but waiting for the "published" lines: a publisher logs them
    after ``cvmfs_server publish`` returns, and with this slower backend the batches are big
    (up to 64 entries), so the last lines come a while after the CIDs became visible."""
    path, config = site
    spool = Spool(config.server.spool)
    spool.ensure_layout()
    pubs = [start_publisher(path, r, tmp_path) for r in (REPO1, REPO2)]
    try:
        for p in pubs:
            p.wait_log("publisher ready")
        cids = [f"g{i % 7}/{i:04d}" for i in range(200)]
        for i, cid in enumerate(cids):
            tarball = make_tarball(tmp_path / f"t{i}.tar.gz", {"id": cid.encode(), "n/x": b"y" * i})
            spool.drop_file(tarball, cid, "tester")

        def all_done():
            return sum((cid_dir(config, 0, c).is_dir() or cid_dir(config, 1, c).is_dir())
                       for c in cids) == len(cids)
        wait_for(all_done, 120, lambda: pubs[0].log()[-3000:] + pubs[1].log()[-3000:])
        for cid in cids:
            places = [i for i in (0, 1) if cid_dir(config, i, cid).is_dir()]
            assert len(places) == 1, (cid, places)
            assert (cid_dir(config, places[0], cid) / "id").read_bytes() == cid.encode()
        wait_for(lambda: (pubs[0].log() + pubs[1].log()).count(": published ") >= 200, 30)
        logs = pubs[0].log() + pubs[1].log()
        assert logs.count(": published ") == 200
        counts = [p.log().count(": published ") for p in pubs]
        assert all(c > 0 for c in counts), counts  # both did work
        assert spool.depth().failed == 0
    finally:
        for p in pubs:
            p.stop()


def test_drop_is_published_with_content_marker_and_record(site, cvmfs_double, tmp_path):
    path, config = site
    files = {"bin/run.sh": b"#!/bin/sh\necho hi\n", "lib/data.txt": b"x" * 10_000, "README": b"r"}
    tarball = make_tarball(tmp_path / "code.tar.gz", files)
    pub = start_publisher(path, REPO1, tmp_path)
    try:
        pub.wait_log("publisher ready")
        out = run_userpub(path, "drop", str(tarball), "--cid", "grp/abc123").stdout.strip()
        assert out == "grp/abc123"
        target = cid_dir(config, 0, "grp/abc123")
        wait_for(target.is_dir, 30, pub.log)
        listing = tree_listing(target)
        for name, data in files.items():
            assert listing[name] == data
        assert listing[".cvmfscatalog"] == b""
        assert b"userpub drop" in listing[".publisher"]
        assert oct(os.stat(target / "lib/data.txt").st_mode & 0o777) == "0o644"
        status = run_userpub(path, "status", "grp/abc123").stdout.strip()
        assert status == f"PRESENT:{config.repositories[0].mount}/sw/grp/abc123"
        spool = Spool(config.server.spool)
        wait_for(lambda: spool.depth().incoming == 0 and not any(spool.iter_active(REPO1)))
        assert os.listdir(target.parent) == ["abc123"]  # no hidden unpacking leftovers
        assert not cvmfs_double.in_transaction(REPO1)
        wait_for(lambda: commands(cvmfs_double)[-2:] == [f"transaction {REPO1}",
                                                         f"publish {REPO1}"])
    finally:
        assert pub.stop() == 0


def _unpacking(double):
    """True once the publisher is writing the big CID into the open transaction."""
    return any((double.mount(REPO1) / "sw" / "grp").glob(".userpub-*/d*/*"))


def test_kill_9_mid_unpack_then_restart_publishes_completely(site, cvmfs_double, tmp_path):
    path, config = site
    expected = big_tarball(tmp_path / "big.tar", files=4000, size=20_000)
    run_userpub(path, "drop", str(tmp_path / "big.tar"), "--cid", "grp/big")
    target = cid_dir(config, 0, "grp/big")
    partial_views: list[int] = []
    stop = threading.Event()

    def reader():  # a reader of the published revision must never see a partial tree
        while not stop.is_set():
            if target.is_dir():
                n = sum(len(f) for _, _, f in os.walk(target))
                if n != len(expected) + 2:
                    partial_views.append(n)
            time.sleep(0.001)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        pub = start_publisher(path, REPO1, tmp_path, "victim")
        wait_for(lambda: _unpacking(cvmfs_double), 60, pub.log)
        pub.kill()
        assert not target.exists()
        assert cvmfs_double.in_transaction(REPO1)  # left open by the crash
        assert any(Spool(config.server.spool).iter_active(REPO1))
        again = start_publisher(path, REPO1, tmp_path, "again")
        wait_for(target.is_dir, 120, again.log)
        log = again.log()
        assert "aborted a transaction left open by a previous publisher" in log
        assert "returned 1 claimed entries" in log
        assert again.stop() == 0
    finally:
        stop.set()
        watcher.join()
    assert partial_views == []
    listing = tree_listing(target)
    assert {k: len(v) for k, v in listing.items() if not isinstance(v, str)} == \
        {**expected, ".cvmfscatalog": 0, ".publisher": len(listing[".publisher"])}
    assert os.listdir(target.parent) == ["big"]


def test_sigterm_finishes_the_current_batch(site, cvmfs_double, tmp_path):
    path, config = site
    big_tarball(tmp_path / "big.tar", files=3000, size=10_000)
    pub = start_publisher(path, REPO1, tmp_path)
    pub.wait_log("publisher ready")
    run_userpub(path, "drop", str(tmp_path / "big.tar"), "--cid", "grp/big")
    wait_for(lambda: _unpacking(cvmfs_double), 60, pub.log)
    assert pub.stop() == 0
    assert cid_dir(config, 0, "grp/big").is_dir()
    assert not cvmfs_double.in_transaction(REPO1)


# -- cvmfs_server failures, as the publisher daemon lives them -----------------------------

def test_failing_transaction_releases_the_entries_which_a_later_pass_publishes(
        site, cvmfs_double, tmp_path):
    path, config = site
    cvmfs_double.fail("transaction", exit=5, stderr="CernVM-FS transaction error: lease busy",
                      times=1)
    drop(path, tmp_path, "grp/a")
    drop(path, tmp_path, "grp/b")
    result = once(path)
    assert (f"transaction of 2 entries failed: cvmfs_server transaction {REPO1} exited with 5: "
            "CernVM-FS transaction error: lease busy") in result.stderr
    assert not cid_dir(config, 0, "grp/a").exists()
    assert Spool(config.server.spool).depth().incoming == 2
    once(path)
    assert cid_dir(config, 0, "grp/a").is_dir() and cid_dir(config, 0, "grp/b").is_dir()
    assert failed_reasons(config) == {}


def test_an_open_transaction_is_aborted_and_the_batch_published(site, cvmfs_double, tmp_path):
    path, config = site
    pub = start_publisher(path, REPO1, tmp_path)
    try:
        pub.wait_log("publisher ready")
        assert cvmfs_double.run("transaction", REPO1).returncode == 0  # e.g. an operator
        (cvmfs_double.mount(REPO1) / "junk").write_text("not ours")
        drop(path, tmp_path, "grp/a")
        wait_for(cid_dir(config, 0, "grp/a").is_dir, 30, pub.log)
        assert "a transaction is already open" in pub.log()
        wait_for(lambda: commands(cvmfs_double)[-1] == f"publish {REPO1}")  # logged at exit
        assert commands(cvmfs_double)[-4:] == [f"transaction {REPO1}", f"abort -f {REPO1}",
                                               f"transaction {REPO1}", f"publish {REPO1}"]
        assert not (config.repositories[0].root / "junk").exists()
    finally:
        assert pub.stop() == 0


def test_unpack_error_fails_only_that_cid(site, cvmfs_double, tmp_path):
    path, config = site
    drop(path, tmp_path, "grp/good1")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.addfile(tarfile.TarInfo("fine"))
        tar.addfile(tarfile.TarInfo("../../etc/evil"))
    run_userpub(path, "drop", str(bad), "--cid", "grp/bad")
    drop(path, tmp_path, "grp/good2")
    before = len(commands(cvmfs_double))
    once(path)
    assert sorted(os.listdir(config.repositories[0].root / "sw" / "grp")) == ["good1", "good2"]
    reasons = failed_reasons(config)
    assert list(reasons) == ["grp/bad"] and ".." in reasons["grp/bad"]
    assert commands(cvmfs_double)[before:] == [f"abort -f {REPO1}",  # recover() at startup
                                               f"transaction {REPO1}", f"publish {REPO1}"]


def test_failing_publish_aborts_and_the_entries_are_retried(site, cvmfs_double, tmp_path):
    path, config = site
    cvmfs_double.fail("publish", exit=1, stderr="Failed to commit transaction.", times=1)
    drop(path, tmp_path, "grp/a")
    result = once(path)
    assert (f"cvmfs_server publish {REPO1} exited with 1: Failed to commit transaction."
            in result.stderr)
    assert commands(cvmfs_double)[-2:] == [f"publish {REPO1}", f"abort -f {REPO1}"]
    assert not cvmfs_double.in_transaction(REPO1)
    assert not cid_dir(config, 0, "grp/a").exists()
    assert not (cvmfs_double.mount(REPO1) / "sw" / "grp").exists()  # aborted: nothing kept
    once(path)
    assert (cid_dir(config, 0, "grp/a") / "id").read_bytes() == b"grp/a"


def test_publish_failing_every_time_fails_the_entries_after_max_attempts(cvmfs_double,
                                                                         tmp_path):
    path, config = make_site(tmp_path, cvmfs_double, publisher="max_attempts = 2")
    cvmfs_double.fail("publish", exit=1, stderr="Signing failed")
    drop(path, tmp_path, "grp/a")
    pub = start_publisher(path, REPO1, tmp_path)
    try:
        wait_for(lambda: failed_reasons(config), 60, pub.log)
    finally:
        assert pub.stop() == 0
    assert failed_reasons(config) == {"grp/a": "gave up after 2 attempts: cvmfs_server publish "
                                               f"{REPO1} exited with 1: Signing failed"}
    assert not cvmfs_double.in_transaction(REPO1)


def test_hanging_publish_times_out_is_killed_and_retried(cvmfs_double, tmp_path):
    path, config = make_site(tmp_path, cvmfs_double, repo_extra="command_timeout = 3")
    cvmfs_double.fail("publish", exit=None, hang=600, times=1)
    drop(path, tmp_path, "grp/a")
    pub = start_publisher(path, REPO1, tmp_path)
    try:
        wait_for(cid_dir(config, 0, "grp/a").is_dir, 90, pub.log)
    finally:
        assert pub.stop() == 0
    assert f"cvmfs_server publish {REPO1} timed out after 3 s and was killed" in pub.log()
    (hung,) = cvmfs_double.hung_pids()
    assert not alive(hung)  # killed with the process group of the publish command
    assert cvmfs_double.started().count(f"publish {REPO1}") == 2
    assert commands(cvmfs_double) == [  # finished commands: the first publish never did
        f"abort -f {REPO1}", f"transaction {REPO1}",  # recover() at startup, the batch
        f"abort -f {REPO1}",  # after the timeout
        f"transaction {REPO1}", f"publish {REPO1}"]  # the retry


def test_stamps_and_present_cids_go_in_one_transaction(site, cvmfs_double, tmp_path):
    path, config = site
    drop(path, tmp_path, "grp/a")
    once(path)
    spool = Spool(config.server.spool)
    for cid in ("grp/a", "grp/elsewhere", "solo"):
        spool.drop_stamp(cid, "bob")
    drop(path, tmp_path, "grp/a")  # published already: stamped, not unpacked again
    before = len(commands(cvmfs_double))
    once(path)
    assert commands(cvmfs_double)[before:] == [f"abort -f {REPO1}", f"transaction {REPO1}",
                                               f"publish {REPO1}"]
    stamps = config.repositories[0].root / "ts"
    assert sorted(str(p.relative_to(stamps)) for p in stamps.rglob("*") if p.is_file()) == \
        ["grp/a", "grp/elsewhere", "solo"]
    assert spool.depth().incoming == 0 and failed_reasons(config) == {}


def test_janitor_removes_expired_cids_in_one_transaction_then_collects_garbage(
        site, cvmfs_double, tmp_path):
    _, config = site
    repo = open_repository(config, config.repositories[0])
    old = time.time() - 40 * 86400
    with repo.transaction() as txn:
        for cid in ("grp/old1", "grp/old2", "grp/young", "solo-old"):
            tarball = make_tarball(tmp_path / f"{cid.replace('/', '_')}.tar.gz", {"f": b"x"})
            txn.add(cid, tarball, "alice", UnpackLimits())
        txn.stamp(["gone/stamp"], "bob")  # a stamp whose CID exists nowhere
        union = cvmfs_double.mount(REPO1)
        for cid in ("grp/old1", "grp/old2", "solo-old"):
            os.utime(union / "sw" / cid / ".publisher", (old, old))
            os.utime(union / "sw" / cid, (old, old))
        os.utime(union / "ts/gone/stamp", (old, old))
    other = open_repository(config, config.repositories[1])
    with other.transaction() as txn:  # the janitor reads every repository's tree
        txn.add("grp/other", make_tarball(tmp_path / "o.tar.gz", {"f": b"o"}), "alice",
                UnpackLimits())
    before = len(commands(cvmfs_double))
    result = clean(config, REPO1)
    assert (result.cids, result.stamps, result.completed) == (3, 1, True)
    assert sorted(repo.cids()) == ["grp/young"] and list(repo.stamps()) == []
    assert commands(cvmfs_double)[before:] == [
        f"abort -f {REPO1}",  # recover(): nothing open
        f"transaction {REPO1}", f"publish {REPO1}",  # every removal in one transaction
        f"gc -f {REPO1}"]
