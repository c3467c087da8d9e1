"""A cleanup pauses its own repository's publishing only; the other repositories go on.

Everything is a real process: two publishers and ``userpub janitor --now``. The janitor is
frozen with SIGSTOP while it holds the transaction lock, which makes its cleanup as long as the
test needs, deterministically.
"""

from __future__ import annotations

import contextlib
import signal
import time

import pytest
from filelock import FileLock, Timeout

from tests.helpers import Daemon, make_tarball, run_userpub, wait_for
from tests.integration.test_janitor_support import REPO1, REPO2, Site
from userpub.locks import transaction_lock_path


def test_other_repository_publishes_while_a_cleanup_holds_this_repositorys_lock(tmp_path):
    site = Site(tmp_path / "site")
    site.publish(REPO1, [f"g/old{i:03d}" for i in range(400)], age_days=40)
    site.publish(REPO1, ["g/recent"], age_days=1)
    y = make_tarball(tmp_path / "y.tar.gz", {"y.txt": b"waits for the cleanup"})
    x = make_tarball(tmp_path / "x.tar.gz", {"x.txt": b"published meanwhile"})
    y_dir, x_dir = site.root(REPO1) / "sw/g/y", site.root(REPO2) / "sw/g/x"

    pub1 = Daemon(site.path, "publisher", "--repo", REPO1, log=tmp_path / "pub1.log")
    pub2 = None
    janitor = None
    try:
        pub1.wait_log("publisher ready")
        janitor = Daemon(site.path, "janitor", "--now", "--repo", REPO1,
                         log=tmp_path / "janitor.log")
        janitor.wait_log("cleanup started")
        janitor.proc.send_signal(signal.SIGSTOP)  # a very long cleanup, holding the lock
        probe = FileLock(transaction_lock_path(site.config, REPO1))
        with pytest.raises(Timeout):
            probe.acquire(blocking=False)

        # the same repository's publisher claims Y, then waits for the lock
        run_userpub(site.path, "drop", str(y), "--cid", "g/y")
        wait_for(lambda: any(site.spool.iter_active(REPO1)), 15, pub1.log)

        # the other repository's publisher is not held up
        pub2 = Daemon(site.path, "publisher", "--repo", REPO2, log=tmp_path / "pub2.log")
        pub2.wait_log("publisher ready")
        run_userpub(site.path, "drop", str(x), "--cid", "g/x")
        wait_for(x_dir.is_dir, 30, pub2.log)
        assert (x_dir / "x.txt").read_bytes() == b"published meanwhile"

        time.sleep(1.0)
        assert not y_dir.exists()
        assert [p.name for p in site.spool.iter_active(REPO1)] == ["g%2Fy"]
        assert janitor.proc.poll() is None

        janitor.proc.send_signal(signal.SIGCONT)
        assert janitor.proc.wait(120) == 0
        assert "cleanup success: 400 CIDs" in janitor.log()
        wait_for(y_dir.is_dir, 30, pub1.log)
        assert (y_dir / "y.txt").read_bytes() == b"waits for the cleanup"
        assert site.cids(REPO1) == {"g/recent", "g/y"}
    finally:
        if janitor is not None and janitor.proc.poll() is None:
            janitor.proc.send_signal(signal.SIGCONT)
            janitor.kill()
        for daemon in (pub1, pub2, janitor):
            if daemon is not None:
                with contextlib.suppress(Exception):
                    daemon.stop()
    assert pub1.proc.returncode == 0 and pub2 is not None and pub2.proc.returncode == 0
