"""The cvmfs_server test double enforces the contract the backend relies on.

These tests pin the double itself: if it stopped enforcing (say) read-only mounts outside
a transaction, the backend tests would pass for the wrong reason.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from tests.helpers import make_tarball

REPO = "repo1.example.org"


@pytest.fixture
def double(cvmfs_double):
    cvmfs_double.mkfs(REPO)
    return cvmfs_double


def write_fails_readonly(path):
    with pytest.raises(OSError) as info:
        path.write_text("x")
    assert info.value.errno == errno.EROFS


def test_mount_is_writable_only_inside_a_transaction(double):
    mount = double.mount(REPO)
    write_fails_readonly(mount / "outside")  # even for root
    assert double.run("transaction", REPO).returncode == 0
    (mount / "inside").write_text("x")
    assert double.run("abort", "-f", REPO).returncode == 0
    write_fails_readonly(mount / "again")
    assert not (mount / "inside").exists()  # aborted changes are gone
    write_fails_readonly(double.published(REPO) / "never")


def test_publish_and_abort_without_a_transaction_fail_like_cvmfs_server(double):
    publish = double.run("publish", REPO)
    assert publish.returncode == 1
    assert f"Repository {REPO} is not in a transaction" in publish.stdout
    abort = double.run("abort", "-f", REPO)
    assert abort.returncode == 22
    assert f"Repository {REPO} is not in a transaction" in abort.stderr


def test_transaction_while_one_is_open_fails_with_eexist(double):
    assert double.run("transaction", REPO).returncode == 0
    second = double.run("transaction", REPO)
    assert second.returncode == 17
    assert "another transaction is already open" in second.stderr
    assert double.in_transaction(REPO)


def test_gc_is_refused_during_a_transaction_and_needs_gc_enabled(double):
    assert double.run("transaction", REPO).returncode == 0
    refused = double.run("gc", "-f", REPO)
    assert refused.returncode == 1
    assert "Cannot run garbage collection while in a transaction" in refused.stderr
    assert double.run("abort", "-f", REPO).returncode == 0
    assert double.run("gc", "-f", REPO).returncode == 0
    double.mkfs("nogc.example.org", gc=False)
    assert "not enabled" in double.run("gc", "-f", "nogc.example.org").stderr


def test_readers_see_only_published_content(double):
    mount, published = double.mount(REPO), double.published(REPO)
    assert double.run("transaction", REPO).returncode == 0
    (mount / "sw/a").mkdir(parents=True)
    (mount / "sw/a/f").write_text("new")
    assert not (published / "sw").exists()  # uncommitted: not in the published revision
    assert double.run("publish", REPO).returncode == 0
    assert (published / "sw/a/f").read_text() == "new"
    assert (mount / "sw/a/f").read_text() == "new"  # the mount shows the published revision
    write_fails_readonly(mount / "sw/a/g")


def test_publish_applies_deletions_replacements_and_read_only_dirs(double):
    mount, published = double.mount(REPO), double.published(REPO)
    double.run("transaction", REPO)
    (mount / "sw/a/ro").mkdir(parents=True)
    (mount / "sw/a/ro/f").write_text("1")
    (mount / "sw/b").mkdir()
    (mount / "sw/b/old").write_text("old")
    os.chmod(mount / "sw/a/ro", 0o555)
    double.run("publish", REPO)
    assert oct((published / "sw/a/ro").stat().st_mode & 0o777) == "0o555"
    double.run("transaction", REPO)
    os.chmod(mount / "sw/a/ro", 0o755)
    (mount / "sw/a/ro/f").unlink()  # a whiteout in the scratch area
    (mount / "sw/a/ro").rmdir()
    (mount / "sw/b/old").unlink()
    (mount / "sw/b").rmdir()
    (mount / "sw/b").mkdir()  # an opaque directory
    (mount / "sw/b/new").write_text("new")
    double.run("publish", REPO)
    assert sorted(os.listdir(published / "sw/a")) == []
    assert sorted(os.listdir(published / "sw/b")) == ["new"]
    assert double.revision(REPO) == 2


def test_a_reader_never_finds_the_published_view_empty_during_publish(double):
    mount, published = double.mount(REPO), double.published(REPO)
    double.run("transaction", REPO)
    (mount / "sw").mkdir()
    (mount / "sw/keep").write_text("k")
    double.run("publish", REPO)
    misses: list[float] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            if not (published / "sw/keep").exists():
                misses.append(time.monotonic())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(5):
            double.run("transaction", REPO)
            (mount / f"sw/n{i}").write_text(str(i))
            assert double.run("publish", REPO).returncode == 0
    finally:
        stop.set()
        thread.join()
    assert misses == []


def test_faults_fail_a_command_a_number_of_times(double):
    double.fail("transaction", exit=5, stderr="CernVM-FS transaction error: disk on fire", times=1)
    failed = double.run("transaction", REPO)
    assert (failed.returncode, failed.stderr.strip()) == \
        (5, "CernVM-FS transaction error: disk on fire")
    assert not double.in_transaction(REPO)  # a fault changes nothing
    assert double.run("transaction", REPO).returncode == 0
    double.fail("publish", exit=3, repo="other.example.org")
    assert double.run("publish", REPO).returncode == 0  # the fault is for another repository
    assert double.commands(REPO)[-1] == (f"publish {REPO}", 0)


def test_hang_fault_sleeps_in_a_child(double):
    double.fail("publish", exit=None, hang=0.5, times=1)
    double.run("transaction", REPO)
    started = time.monotonic()
    assert double.run("publish", REPO).returncode == 0  # hangs, then works
    assert time.monotonic() - started >= 0.5
    assert len(double.hung_pids()) == 1


def test_ingest_streams_a_tarball_into_a_nested_catalog(double, tmp_path):
    tarball = make_tarball(tmp_path / "t.tar", {"bin/x": b"x"}, mode="w")
    bad = double.run("ingest", "-t", str(tarball), "-b", "sw/c1/", "-c", REPO)
    assert bad.returncode == 1 and "#2818" in bad.stderr
    ok = double.run("ingest", "-t", str(tarball), "-b", "sw/c1", "-c", REPO)
    assert ok.returncode == 0, ok.stderr
    published = double.published(REPO)
    assert (published / "sw/c1/bin/x").read_bytes() == b"x"
    assert (published / "sw/c1/.cvmfscatalog").is_file()
    double.run("transaction", REPO)
    assert double.run("ingest", "-t", str(tarball), "-b", "sw/c2", REPO).returncode == 1
