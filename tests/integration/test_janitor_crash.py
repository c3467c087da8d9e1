"""kill -9 of a real ``userpub janitor --now`` at random points of a long cleanup."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.helpers import Daemon, run_userpub, wait_for
from tests.integration.test_janitor_support import FILES, REPO1, Site, cid_listing

FILES_PER_CID = {**FILES, **{f"src/m{i}/f{j}.py": b"x = 1\n" * (i + j) for i in range(3)
                             for j in range(2)}}


def check_complete_or_absent(site: Site, expected: list[tuple[str, int]]) -> set[str]:
    """Every directory under sw/ is a complete CID; return the CIDs present."""
    sw = site.root(REPO1) / "sw"
    present = set()
    for name in os.listdir(sw):
        if name == "g":
            for child in os.listdir(sw / "g"):
                assert cid_listing(sw / "g" / child) == expected, f"g/{child} is incomplete"
                present.add(f"g/{child}")
        else:
            assert cid_listing(sw / name) == expected, f"{name} is incomplete"
            present.add(name)
    assert present == site.cids(REPO1)
    return present


@pytest.mark.slow
def test_kill_9_mid_cleanup_leaves_every_cid_complete_or_absent(tmp_path):
    rng = random.Random(20261125)
    site = Site(tmp_path / "site")
    old = [f"g/c{i:04d}" for i in range(1000)] + [f"f{i:04d}" for i in range(200)]
    fresh = [f"g/n{i:04d}" for i in range(150)] + [f"n{i:04d}" for i in range(50)]
    site.publish(REPO1, old, age_days=40, files=FILES_PER_CID)
    site.publish(REPO1, fresh, age_days=3, files=FILES_PER_CID)
    for cid in old[::7]:  # some read-only trees, as users' tarballs may leave them
        os.chmod(site.root(REPO1) / "sw" / cid / "src/m1", 0o555)
    expected = cid_listing(site.root(REPO1) / "sw" / old[0])
    assert len(expected) > 15
    assert check_complete_or_absent(site, expected) == set(old) | set(fresh)

    kills = []
    for attempt in range(8):
        janitor = Daemon(site.path, "janitor", "--now", "--repo", REPO1,
                         log=tmp_path / f"janitor{attempt}.log")
        # first kill during the scan, later ones at random points of the removals and gc
        marker = "cleanup started" if attempt == 0 else "removed "
        wait_for(lambda j=janitor, m=marker: m in j.log() or j.proc.poll() is not None, 60,
                 janitor.log)
        if janitor.proc.poll() is not None:
            assert janitor.proc.returncode == 0, janitor.log()
            break
        time.sleep(rng.uniform(0, 0.02 if attempt == 0 else 0.6))
        janitor.kill()
        janitor.stop()
        present = check_complete_or_absent(site, expected)
        assert present >= set(fresh)  # nothing fresh ever goes
        kills.append(len(present))
    assert len(kills) >= 4, kills
    assert kills == sorted(kills, reverse=True)
    assert kills[-1] < len(old) + len(fresh)  # some kills happened after removals began

    # a complete run afterwards finishes the job and leaves no debris
    proc = run_userpub(site.path, "janitor", "--now", "--repo", REPO1)
    assert "cleanup success" in proc.stderr
    assert check_complete_or_absent(site, expected) == set(fresh)
    assert site.trash_is_empty(REPO1)
    assert not any((site.root(REPO1) / ".userpub/staging").iterdir())
