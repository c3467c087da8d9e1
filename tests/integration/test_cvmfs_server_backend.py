"""The cvmfs-server backend against the cvmfs_server double: every path, failures included."""

from __future__ import annotations

import os
import tarfile
import time

import pytest

from publisher.repositories import CvmfsServerRepository, RepositoryError, open_reader
from publisher.repositories.catalog import Catalog
from publisher.tarball import UnpackError, UnpackLimits
from tests.helpers import make_tarball, tree_listing, write_config
from userpub.config import load_config

REPO = "repo1.example.org"
LIMITS = UnpackLimits()


def backend(double, *, timeout=20.0, ingest=False):
    return CvmfsServerRepository(REPO, double.mount(REPO), double.published(REPO), "sw", "ts",
                                 timeout=timeout, ingest=ingest)


@pytest.fixture
def double(cvmfs_double):
    cvmfs_double.mkfs(REPO)
    return cvmfs_double


@pytest.fixture
def repo(double):
    return backend(double)


@pytest.fixture
def tarballs(tmp_path):
    def make(name, files=None):
        return make_tarball(tmp_path / f"{name.replace('/', '_')}.tar.gz",
                            files or {"bin/run.sh": b"#!/bin/sh\n", "data/x": name.encode()})
    return make


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def calls(double):
    return [c for c, _ in double.commands(REPO) if not c.startswith("mkfs")]


def test_a_batch_is_one_transaction_and_becomes_visible_at_publish(double, repo, tarballs):
    with repo.transaction() as txn:
        stats = txn.add("grp/a1", tarballs("grp/a1"), "alice", LIMITS)
        txn.add("b2", tarballs("b2"), "bob", LIMITS)
        txn.stamp(["old/c3"], "carol")
        assert not repo.contains("grp/a1")  # not published yet: readers see nothing
        assert (double.mount(REPO) / "sw/grp/a1/data/x").is_file()  # but it is written
    assert stats.files == 2 and stats.compression == "gzip"
    assert calls(double) == [f"transaction {REPO}", f"publish {REPO}"]
    assert repo.contains("grp/a1") and repo.contains("b2")
    listing = tree_listing(repo.path_of("grp/a1"))
    assert listing["data/x"] == b"grp/a1"
    assert listing[".cvmfscatalog"] == b"" and listing[".publisher"] == b"alice\n"
    assert sorted(repo.cids()) == ["b2", "grp/a1"]
    assert list(repo.stamps()) == ["old/c3"] and repo.stamped_at("old/c3") is not None
    assert repo.visible_path("b2") == f"{double.mount(REPO)}/sw/b2"
    assert not double.in_transaction(REPO)


def test_longest_cid_components_can_be_added_and_stamped(double, repo, tarballs):
    longest = "g" * 120 + "/" + "c" * 134  # 255 characters, the longest CID
    with repo.transaction() as txn:
        txn.add(longest, tarballs("long"), "alice", LIMITS)
        txn.add("d" * 255, tarballs("long"), "alice", LIMITS)
        txn.stamp([longest, "s" * 255], "bob")
    assert repo.contains(longest) and repo.contains("d" * 255)
    assert repo.stamped_at(longest) is not None and repo.stamped_at("s" * 255) is not None


def test_unpack_error_fails_only_that_cid(double, repo, tarballs, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.addfile(tarfile.TarInfo("ok"))
        evil = tarfile.TarInfo("../evil")
        tar.addfile(evil)
    with repo.transaction() as txn:
        txn.add("grp/good", tarballs("grp/good"), "alice", LIMITS)
        with pytest.raises(UnpackError):
            txn.add("newgrp/bad", bad, "mallory", LIMITS)
        txn.add("grp/after", tarballs("grp/after"), "alice", LIMITS)
    assert sorted(repo.cids()) == ["grp/after", "grp/good"]
    published = double.published(REPO) / "sw"
    assert sorted(os.listdir(published)) == ["grp"]  # no empty group, no hidden leftovers
    assert sorted(os.listdir(published / "grp")) == ["after", "good"]


def test_an_open_transaction_is_aborted_and_opened_again(double, repo, tarballs):
    assert double.run("transaction", REPO).returncode == 0  # left by a crash
    (double.mount(REPO) / "junk").write_text("uncommitted")
    with repo.transaction() as txn:
        txn.add("c1", tarballs("c1"), "alice", LIMITS)
    assert calls(double)[-4:] == [f"transaction {REPO}", f"abort -f {REPO}",
                                  f"transaction {REPO}", f"publish {REPO}"]
    assert repo.contains("c1") and not (double.published(REPO) / "junk").exists()


def test_a_failing_transaction_raises_naming_command_and_exit_code(double, repo):
    double.fail("transaction", exit=5, stderr="CernVM-FS transaction error: no space left")
    with pytest.raises(RepositoryError) as info, repo.transaction():
        pytest.fail("the body must not run")
    assert str(info.value) == (f"cvmfs_server transaction {REPO} exited with 5: "
                               "CernVM-FS transaction error: no space left")
    assert calls(double) == [f"transaction {REPO}"]


def test_a_failing_publish_aborts_and_nothing_becomes_visible(double, repo, tarballs):
    double.fail("publish", exit=1, stderr="Failed to commit transaction.", times=1)
    with pytest.raises(RepositoryError, match=rf"cvmfs_server publish {REPO} exited with 1: "
                                              "Failed to commit transaction."), \
            repo.transaction() as txn:
        txn.add("c1", tarballs("c1"), "alice", LIMITS)
    assert calls(double)[-2:] == [f"publish {REPO}", f"abort -f {REPO}"]
    assert not double.in_transaction(REPO) and not repo.contains("c1")
    with repo.transaction() as txn:  # the next batch works
        txn.add("c1", tarballs("c1"), "alice", LIMITS)
    assert repo.contains("c1")


def test_an_exception_in_the_batch_aborts_and_becomes_a_repository_error(double, repo, tarballs):
    with pytest.raises(RepositoryError, match="transaction failed: boom") as info, \
            repo.transaction() as txn:
        txn.add("c1", tarballs("c1"), "alice", LIMITS)
        raise ValueError("boom")
    assert isinstance(info.value.__cause__, ValueError)
    assert calls(double)[-1] == f"abort -f {REPO}" and not repo.contains("c1")
    with pytest.raises(KeyboardInterrupt), repo.transaction():
        raise KeyboardInterrupt
    assert not double.in_transaction(REPO)


def test_a_hanging_publish_times_out_is_killed_and_aborted(double, tarballs):
    repo = backend(double, timeout=2)
    double.fail("publish", exit=None, hang=120, times=1)
    started = time.monotonic()
    with pytest.raises(RepositoryError, match=rf"cvmfs_server publish {REPO} timed out after 2 s "
                                              "and was killed"), repo.transaction() as txn:
        txn.add("c1", tarballs("c1"), "alice", LIMITS)
    assert time.monotonic() - started < 30
    (pid,) = double.hung_pids()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)  # the whole process group was killed
    assert calls(double)[-1] == f"abort -f {REPO}" and not double.in_transaction(REPO)


def test_removals_and_stamps_go_in_one_transaction(double, repo, tarballs):
    with repo.transaction() as txn:
        txn.add("g/old", tarballs("g/old"), "alice", LIMITS)
        txn.add("g/keep", tarballs("g/keep"), "alice", LIMITS)
        txn.add("solo", tarballs("solo"), "alice", LIMITS)
        txn.stamp(["g/old", "solo"], "bob")
        # CIDs that the original service unpacked with tar keep their read-only directories
        locked = double.mount(REPO) / "sw/g/old/locked"
        locked.mkdir()
        (locked / "f").write_bytes(b"abc")
        locked.chmod(0o555)
    assert oct(repo.path_of("g/old").joinpath("locked").stat().st_mode & 0o777) == "0o555"
    before = len(double.commands(REPO))
    with repo.transaction() as txn:
        result = txn.remove(["g/old", "solo", "never/there"], stamps=["g/old", "missing"])
    assert (result.cids, result.stamps) == (2, 1)
    sizes = len("#!/bin/sh\n") + len("g/old") + 3 + len("#!/bin/sh\n") + len("solo")
    assert result.bytes_freed == sizes + 2 * len("alice\n")
    assert [c for c, _ in double.commands(REPO)[before:]] == [f"transaction {REPO}",
                                                               f"publish {REPO}"]
    assert sorted(repo.cids()) == ["g/keep"] and sorted(repo.stamps()) == ["solo"]
    with repo.transaction() as txn:
        txn.remove(["g/keep"], stamps=["solo"])
    assert os.listdir(double.published(REPO) / "sw") == []  # empty groups go too
    assert os.listdir(double.published(REPO) / "ts") == []


def test_gc_runs_cvmfs_server_gc_and_reports_failures(double, repo):
    result = repo.gc()
    assert calls(double)[-1] == f"gc -f {REPO}" and result.bytes_freed == 0
    double.run("transaction", REPO)
    with pytest.raises(RepositoryError, match="Cannot run garbage collection while in a trans"):
        repo.gc()


def test_recover_aborts_a_transaction_left_open(double, repo):
    repo.recover()  # nothing open: fine
    assert double.commands(REPO)[-1] == (f"abort -f {REPO}", 22)
    double.run("transaction", REPO)
    repo.recover()
    assert not double.in_transaction(REPO)


def test_recover_reports_other_abort_failures(double, repo):
    double.fail("abort", exit=5, stderr="publisher file system mount state is broken")
    with pytest.raises(RepositoryError, match=r"abort -f .* exited with 5: publisher file sys"):
        repo.recover()


def test_cvmfs_server_missing_from_path(double, repo, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(RepositoryError, match="cvmfs_server not found on PATH"):
        repo.recover()


def test_ingest_mode_streams_each_cid_into_cvmfs_server_ingest(double, tarballs, tmp_path):
    repo = backend(double, ingest=True)
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.addfile(tarfile.TarInfo("../escape"))
    with repo.transaction() as txn:
        stats = txn.add("grp/i1", tarballs("grp/i1"), "alice", LIMITS)
        with pytest.raises(UnpackError, match="escapes the CID directory"):
            txn.add("grp/bad", bad, "mallory", LIMITS)
        txn.stamp(["grp/i1"], "bob")
    assert (stats.files, stats.compression) == (2, "gzip")
    listing = tree_listing(repo.path_of("grp/i1"))
    assert listing["data/x"] == b"grp/i1" and listing[".publisher"] == b"alice\n"
    assert listing[".cvmfscatalog"] == b""
    assert not repo.contains("grp/bad") and not double.in_transaction(REPO)
    assert repo.stamped_at("grp/i1") is not None
    ingests = [c for c in calls(double) if c.startswith("ingest")]
    assert ingests[0] == f"ingest -t - -b sw/grp/i1 -c {REPO}"
    assert calls(double)[-2:] == [f"transaction {REPO}", f"publish {REPO}"]  # the stamps


def test_catalog_reads_published_views_and_replicas_never_uncommitted(cvmfs_double, tmp_path,
                                                                      tarballs):
    path = write_config(tmp_path / "site", repos=2, backend="cvmfs-server", hosts={1: "pub2"})
    replica = tmp_path / "cvmfs2" / "repo2.example.org"
    (replica / "sw" / "grp" / "r1").mkdir(parents=True)
    (replica / "sw" / "grp" / "r1" / ".publisher").write_text("other server\n")
    (replica / "ts" / "grp").mkdir(parents=True)
    (replica / "ts" / "grp" / "r1").write_text("x\n")
    text = path.read_text().replace('name = "repo2.example.org"',
                                    f'name = "repo2.example.org"\nreplica = "{replica}"')
    path.write_text(text)
    config = load_config(path)
    cvmfs_double.mkfs(REPO)
    catalog = Catalog.from_config(config)
    location = catalog.locate("grp/r1")
    assert location is not None and location.repository == "repo2.example.org"
    assert location.path == f"{config.repositories[1].mount}/sw/grp/r1"
    assert catalog.last_access("grp/r1") is not None
    repo = backend(cvmfs_double)
    with repo.transaction() as txn:
        txn.add("grp/new", tarballs("grp/new"), "alice", LIMITS)
        assert catalog.locate("grp/new") is None  # open transaction: not published
    assert catalog.locate("grp/new").path == f"{cvmfs_double.mount(REPO)}/sw/grp/new"
    reader = open_reader(config, config.repositories[0])
    assert reader.root == cvmfs_double.published(REPO)
