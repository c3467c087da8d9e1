"""One cleanup over real local repositories and a real spool, with ages set by ``os.utime``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from janitor.cleanup import CleanupError, clean
from publisher.tarball import UnpackLimits
from tests.helpers import REPO_ROOT, run_userpub
from tests.integration.test_janitor_support import (
    DAY,
    REPO1,
    REPO2,
    Site,
    cid_listing,
    snapshot,
)


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path / "site")


def test_expiry_across_repositories(site):
    site.publish(REPO1, ["g/fresh-stamp-b", "g/old-stamp-b", "g/fresh-stamp-a", "g/pub-b",
                         "g/no-stamp"], age_days=40)
    site.publish(REPO1, ["g/young"], age_days=10)
    site.publish(REPO2, ["g/pub-b"], age_days=1)  # published again in B yesterday
    site.stamp(REPO2, ["g/fresh-stamp-b"], age_days=1)  # a fresh stamp in B keeps it in A
    site.stamp(REPO2, ["g/old-stamp-b"], age_days=35)
    site.stamp(REPO1, ["g/fresh-stamp-a"], age_days=2)
    size = sum(s for _, s in cid_listing(site.root(REPO1) / "sw/g/no-stamp") if s > 0)

    result = clean(site.config, REPO1)

    assert site.cids(REPO1) == {"g/fresh-stamp-b", "g/fresh-stamp-a", "g/pub-b", "g/young"}
    assert (result.cids, result.stamps, result.spared) == (2, 0, 0)
    assert result.bytes_freed == 2 * size
    assert result.completed
    assert site.trash_is_empty(REPO1)  # garbage collected
    # the old stamp in B now points to a CID that exists nowhere: B's cleanup removes it
    assert site.stamps(REPO2) == {"g/fresh-stamp-b", "g/old-stamp-b"}
    result2 = clean(site.config, REPO2)
    assert (result2.cids, result2.stamps) == (0, 1)
    assert site.stamps(REPO2) == {"g/fresh-stamp-b"}
    assert site.cids(REPO2) == {"g/pub-b"}


def test_as_of_judges_ages_at_another_time(site):
    site.publish(REPO1, ["g/40d"], age_days=40)
    site.publish(REPO1, ["g/50d"], age_days=50)
    result = clean(site.config, REPO1, as_of=time.time() - 15 * DAY)
    assert result.cids == 1
    assert site.cids(REPO1) == {"g/40d"}


def test_a_future_as_of_never_removes_what_was_used_after_the_scan_began(site):
    site.publish(REPO1, ["g/a", "g/b", "g/c"], age_days=40)
    site.publish(REPO1, ["g/young"], age_days=2)

    def meanwhile(done: int, total: int) -> None:
        if done == 1:
            site.stamp(REPO2, ["g/b"], age_days=0)

    result = clean(site.config, REPO1, as_of=time.time() + 365 * DAY, progress=meanwhile)
    assert site.cids(REPO1) == {"g/b"}
    assert (result.cids, result.spared) == (3, 1)


def test_orphan_stamps_removed(site):
    site.publish(REPO2, ["g/in-b"], age_days=3)
    site.publish(REPO1, ["g/expiring"], age_days=45)
    site.stamp(REPO1, ["g/nowhere", "g/in-b"], age_days=5)
    site.stamp(REPO1, ["g/expiring"], age_days=44)
    site.stamp(REPO1, ["plain-orphan"], age_days=0.5)  # young, but its CID is nowhere

    result = clean(site.config, REPO1)

    assert site.stamps(REPO1) == {"g/in-b"}
    assert result.stamps == 3
    assert result.cids == 1
    assert not (site.root(REPO1) / "ts/g/nowhere").exists()


def test_read_only_directories_removed(site):
    site.publish(REPO1, ["g/ro", "flat-ro"], age_days=40)
    for cid in ("g/ro", "flat-ro"):
        top = site.root(REPO1) / "sw" / cid
        for d in ("lib/a/b", "lib/a", "lib", "bin"):
            os.chmod(top / d, 0o555)
        os.chmod(top / "README", 0o444)
        os.chmod(top, 0o555)
    result = clean(site.config, REPO1)
    assert result.cids == 2
    assert site.cids(REPO1) == set()
    assert site.trash_is_empty(REPO1)


NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the permission-override capabilities")
def test_read_only_directories_removed_without_permission_overrides(tmp_path):
    """Root ignores 0o555; a janitor without CAP_DAC_OVERRIDE/CAP_FOWNER meets it as users do."""
    site = Site(tmp_path / "site")
    site.publish(REPO1, ["g/ro", "flat-ro", "g/keep"], age_days=40)
    site.set_published(REPO1, "g/keep", 1)
    for cid in ("g/ro", "flat-ro"):
        top = site.root(REPO1) / "sw" / cid
        for d in ("lib/a/b", "lib/a", "lib", "bin"):
            os.chmod(top / d, 0o555)
        os.chmod(top / "README", 0o444)
        os.chmod(top, 0o555)
    os.chmod(site.root(REPO1) / "sw/g", 0o555)
    proc = subprocess.run(
        [*NO_DAC, sys.executable, "-m", "userpub", "--config", str(site.path), "janitor",
         "--now", "--repo", REPO1], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == 0, proc.stderr
    assert site.cids(REPO1) == {"g/keep"}
    assert site.trash_is_empty(REPO1)


def test_dry_run_changes_nothing(site):
    site.publish(REPO1, ["g/old", "g/older"], age_days=40)
    site.set_published(REPO1, "g/older", 55.5)
    site.publish(REPO1, ["g/25d"], age_days=25)
    site.stamp(REPO1, ["g/nowhere"], age_days=3)
    _failed_entry(site, "g%2Fbroken", age_days=20)
    _tmp_leftover(site, "123.P1Q0.host", age_days=3)
    os.chmod(site.root(REPO1) / "sw/g/old/lib", 0o555)
    before = snapshot(site.directory)

    out = run_userpub(site.path, "janitor", "--dry-run", "--repo", REPO1).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"# {REPO1}: as of ")
    cid_lines = [line for line in lines if line.startswith("cid ")]
    assert [line.split()[1] for line in cid_lines] == ["g/old", "g/older"]
    assert "age 40.0d" in cid_lines[0] and "age 55.5d" in cid_lines[1]
    assert "last-access " in cid_lines[0] and "bytes 3032" in cid_lines[0]
    assert "stamp g/nowhere orphan: its CID is in no repository" in lines
    assert any(line.startswith("failed g%2Fbroken") and "age 20.0d" in line for line in lines)
    assert any(line.startswith("tmp 123.P1Q0.host") for line in lines)
    assert lines[-1] == ("# would remove 2 CIDs (6064 bytes), 1 stamps, 1 failed entries, "
                         "1 tmp leftovers; 1 CIDs stay")

    # "what will expire next week?", and every hosted repository when --repo is absent
    week = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() + 7 * DAY))
    out = run_userpub(site.path, "janitor", "--dry-run", "--as-of", week).stdout
    assert [line.split()[1] for line in out.splitlines() if line.startswith("cid ")] == [
        "g/25d", "g/old", "g/older"]
    assert f"# {REPO2}: as of" in out

    assert snapshot(site.directory) == before
    assert not (site.config.server.state / "janitor").exists()
    assert not site.config.lock_dir.exists()


def test_failed_entries_and_tmp_leftovers(site):
    _failed_entry(site, "g%2Fold-failure", age_days=20)
    _failed_entry(site, "g%2Frecent-failure", age_days=2)
    (site.spool.failed / "no-reason").mkdir()  # unreadable reason: judged by its mtime
    when = time.time() - 30 * DAY
    os.utime(site.spool.failed / "no-reason", (when, when))
    _tmp_leftover(site, "1.P1Q1.host", age_days=2)
    _tmp_leftover(site, "2.P1Q2.host", age_days=0.1)
    result = clean(site.config, REPO1)
    assert (result.failed_entries, result.tmp_entries) == (2, 1)
    assert sorted(os.listdir(site.spool.failed)) == ["g%2Frecent-failure"]
    assert sorted(os.listdir(site.spool.tmp)) == ["2.P1Q2.host"]


def test_a_cid_used_after_the_scan_began_is_kept(site):
    """Other repositories' publishers go on during a cleanup: each removal re-checks first."""
    cids = [f"g/c{i}" for i in range(6)]
    site.publish(REPO1, cids, age_days=40)
    tarball = site.tarball({"x": b"x"})

    def meanwhile(done: int, total: int) -> None:
        if done == 1:  # after the first removal, before the others
            site.stamp(REPO2, ["g/c2"], age_days=0)
            with site.repo(REPO2).transaction() as txn:
                txn.add("g/c4", tarball, "tester", UnpackLimits())

    result = clean(site.config, REPO1, progress=meanwhile)
    assert site.cids(REPO1) == {"g/c2", "g/c4"}
    assert (result.cids, result.spared) == (4, 2)


def test_a_cid_with_a_request_waiting_in_the_spool_is_kept(site):
    """A stamp request queued, or claimed by a publisher waiting for the lock, is a use."""
    cids = [f"g/c{i}" for i in range(5)]
    site.publish(REPO1, cids, age_days=40)
    site.spool.drop_stamp("g/c0", "user")  # queued before the scan
    (site.spool.active / REPO1).mkdir()

    def meanwhile(done: int, total: int) -> None:
        if done == 1:  # after the scan: one request queued, one claimed by repo1's publisher
            site.spool.drop_stamp("g/c2", "user")
            site.spool.drop_stamp("g/c3", "user")
            site.spool.claim(site.spool.incoming / "g%2Fc3@stamp", REPO1)

    result = clean(site.config, REPO1, progress=meanwhile)
    assert site.cids(REPO1) == {"g/c0", "g/c2", "g/c3"}
    assert (result.cids, result.spared) == (2, 2)
    out = run_userpub(site.path, "janitor", "--dry-run", "--repo", REPO1).stdout
    assert "cid " not in out


def test_an_unreadable_repository_stops_the_cleanup(site):
    site.publish(REPO1, ["g/old"], age_days=40)
    os.rename(site.root(REPO2) / "sw", site.root(REPO2) / "sw.unmounted")
    with pytest.raises(CleanupError, match=r"repo2\.example\.org is unreadable"):
        clean(site.config, REPO1)
    assert site.cids(REPO1) == {"g/old"}
    proc = run_userpub(site.path, "janitor", "--now", "--repo", REPO1, check=False)
    assert proc.returncode == 1
    assert "repo2.example.org is unreadable" in proc.stderr
    assert not (site.config.server.state / "janitor" / f"{REPO1}.json").exists()


def test_cli_now_records_state_and_metrics(site, tmp_path):
    site.publish(REPO1, [f"g/old{i}" for i in range(3)], age_days=40)
    site.publish(REPO1, ["g/new"], age_days=1)
    textfile = tmp_path / "janitor.prom"
    proc = run_userpub(site.path, "janitor", "--now", "--repo", REPO1, "--metrics-textfile",
                       str(textfile))
    assert "cleanup success: 3 CIDs, 0 stamps" in proc.stderr
    state = json.loads((site.config.server.state / "janitor" / f"{REPO1}.json").read_text())
    assert state["cids"] == 3 and state["started"] <= state["finished"] <= time.time()
    metrics = textfile.read_text()
    assert f'userpub_cleanup_removed_cids_total{{repository="{REPO1}"}} 3.0' in metrics
    assert f'userpub_cleanup_runs_total{{repository="{REPO1}",result="success"}} 1.0' in metrics
    assert site.cids(REPO1) == {"g/new"}


@pytest.mark.parametrize(("args", "message"), [
    (["--now", "--repo", "nope"], "repository 'nope' is not configured"),
    (["--now", "--repo", REPO1, "--as-of", "2999-01-01"], "--as-of lies in the future"),
    (["--now", "--as-of", "yesterday"], "not an ISO 8601 time"),
    (["--repo", REPO1], "need --now or --dry-run"),
])
def test_cli_errors_are_one_fatal_line(site, args, message):
    proc = run_userpub(site.path, "janitor", *args, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fatal: ")
    assert message in last


def test_cli_now_refuses_a_repository_hosted_elsewhere(tmp_path):
    site = Site(tmp_path / "site", hosts={1: "pub2"})
    proc = run_userpub(site.path, "janitor", "--now", "--repo", REPO2, check=False)
    assert proc.returncode == 1
    assert "published by pub2, not by this server (pub1)" in proc.stderr
    # a dry run may look at it, though
    assert run_userpub(site.path, "janitor", "--dry-run", "--repo", REPO2).returncode == 0


def _failed_entry(site: Site, name: str, age_days: float) -> None:
    entry = site.spool.failed / name
    entry.mkdir()
    (entry / "payload").write_bytes(b"not a tarball")
    when = time.time() - age_days * DAY
    (entry / "reason.json").write_text(json.dumps({"cid": name, "error": "bad", "time": when}))


def _tmp_leftover(site: Site, name: str, age_days: float) -> None:
    entry = site.spool.tmp / name
    entry.mkdir()
    (entry / "payload").write_bytes(b"half an upload")
    when = time.time() - age_days * DAY
    os.utime(entry / "payload", (when, when))
    os.utime(entry, (when, when))
