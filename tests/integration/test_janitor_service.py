"""The ``userpub janitor`` daemon as a real process: catch-up at startup, metrics, clean stop."""

from __future__ import annotations

import socket
import time
import urllib.request

from janitor.daemon import state_store
from janitor.state import RunRecord
from tests.helpers import Daemon, run_userpub, wait_for
from tests.integration.test_janitor_support import DAY, REPO1, REPO2, Site


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_janitor(site: Site, tmp_path) -> tuple[Daemon, int]:
    """``userpub janitor`` serving metrics on a free port (another if that one got taken)."""
    template = site.path.read_text()
    for attempt in range(5):
        port = free_port()
        site.path.write_text(template.replace('janitor_listen = "127.0.0.1:0"',
                                              f'janitor_listen = "127.0.0.1:{port}"'))
        janitor = Daemon(site.path, "janitor", log=tmp_path / f"janitor{attempt}.log")
        wait_for(lambda j=janitor: "cleaned daily at" in j.log() or j.proc.poll() is not None,
                 60, janitor.log)
        if janitor.proc.poll() is None:
            return janitor, port
        assert "cannot serve metrics" in janitor.log(), janitor.log()
    raise AssertionError("no free port")


def test_daemon_catches_up_missed_runs_at_startup_and_serves_metrics(tmp_path):
    site = Site(tmp_path / "site")
    site.publish(REPO1, ["g/a1", "g/a2"], age_days=40)
    site.publish(REPO2, ["g/b1"], age_days=40)
    site.publish(REPO2, ["g/b2"], age_days=2)
    store = state_store(site.config)
    three_days_ago = time.time() - 3 * DAY
    for name in (REPO1, REPO2):  # the host was down for the last days
        store.save(RunRecord(name, three_days_ago, three_days_ago + 60))

    janitor, port = start_janitor(site, tmp_path)
    try:
        wait_for(lambda: janitor.log().count("cleanup success") == 2, 120, janitor.log)
        assert f"{REPO1}: cleanup success: 2 CIDs" in janitor.log()
        assert f"{REPO2}: cleanup success: 1 CIDs" in janitor.log()
        assert site.cids(REPO1) == set()
        assert site.cids(REPO2) == {"g/b2"}
        for name in (REPO1, REPO2):
            record = store.load(name)
            assert record is not None and record.started > three_days_ago + DAY
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
            text = resp.read().decode()
        assert f'userpub_cleanup_runs_total{{repository="{REPO1}",result="success"}} 1.0' in text
        assert f'userpub_cleanup_removed_cids_total{{repository="{REPO2}"}} 1.0' in text
        assert f'userpub_cleanup_last_success_timestamp_seconds{{repository="{REPO2}"}}' in text
        time.sleep(0.5)
        assert janitor.log().count("cleanup started") == 2  # never twice the same day
    finally:
        code = janitor.stop(timeout=30)
    assert code == 0


def test_once_with_nothing_due_does_nothing(tmp_path):
    site = Site(tmp_path / "site")
    site.publish(REPO1, ["g/a1"], age_days=40)
    store = state_store(site.config)
    now = time.time()
    for name in (REPO1, REPO2):
        store.save(RunRecord(name, now, now))
    proc = run_userpub(site.path, "janitor", "--once")
    assert "cleanup started" not in proc.stderr
    assert "last success" in proc.stderr
    assert site.cids(REPO1) == {"g/a1"}
