"""kill -9 of a real ``userpub janitor --now`` at exact points of a long cleanup.

Each run is held by strace at its k-th ``rename`` (a CID moved to the trash) counted from the
start of the cleanup, then killed: the points are events, not times, so the test does not
depend on the machine's speed.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import Daemon, run_userpub, wait_for
from tests.integration.test_hostile_support import Failpoint
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
    # the first run dies at its first removal, the next ones further into the removals
    for attempt, when in enumerate((1, 2, 40, 150, 300)):
        janitor = Daemon(site.path, "janitor", "--now", "--repo", REPO1,
                         log=tmp_path / f"janitor{attempt}.log")
        wait_for(lambda j=janitor: "cleanup started" in j.log() or j.proc.poll() is not None,
                 60, janitor.log)
        assert janitor.proc.poll() is None, janitor.log()
        with Failpoint(janitor.proc.pid, "rename", when) as point:
            point.wait_hit(120, janitor.log)
            point.kill()
        janitor.stop()
        present = check_complete_or_absent(site, expected)
        assert present >= set(fresh)  # nothing fresh ever goes
        kills.append(len(present))
    assert kills == sorted(kills, reverse=True)
    assert kills[0] >= len(old) + len(fresh) - 1  # held at its first removal
    assert kills[-1] < kills[0]  # and later ones after removals had begun

    # a complete run afterwards finishes the job and leaves no debris
    proc = run_userpub(site.path, "janitor", "--now", "--repo", REPO1)
    assert "cleanup success" in proc.stderr
    assert check_complete_or_absent(site, expected) == set(fresh)
    assert site.trash_is_empty(REPO1)
    assert not any((site.root(REPO1) / ".userpub/staging").iterdir())
