"""The janitor on a cvmfs-native repository: expiry, stamps, removal, gc."""

from __future__ import annotations

import datetime
import time

from janitor.cleanup import clean
from publisher.repositories import open_reader, open_repository
from publisher.tarball import UnpackLimits
from tests.helpers import make_tarball, run_userpub, write_config
from tests.unit.test_cvmfs_native_invariants import check_repository, userpub_verify
from tests.unit.test_cvmfs_native_repository import reachable_now, stored_now
from userpub.config import load_config

REPO = "repo1.example.org"


def test_janitor_removes_expired_cids_and_collects_their_objects(tmp_path):
    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native",
                        repo_extra="gc_keep_hours = 0",
                        extra="[janitor]\nmax_days = 0.001\n")
    run_userpub(path, "keys", "init", REPO)
    config = load_config(path)
    repo = open_repository(config, config.repositories[0])
    repo.recover()
    limits = UnpackLimits()
    t1 = time.time()
    with repo.transaction() as txn:
        for cid in ("g/old1", "g/old2", "solo"):
            txn.add(cid, make_tarball(tmp_path / f"{cid[-4:]}.tgz", {"f": cid.encode() * 999}),
                    "me", limits)
    time.sleep(3)
    with repo.transaction() as txn:
        txn.add("g/new", make_tarball(tmp_path / "new.tgz", {"f": b"new"}), "me", limits)
        txn.stamp(["g/old2"], "a worker node")
    as_of = datetime.datetime.fromtimestamp(t1 + 86.4 + 1.5, datetime.UTC).isoformat()
    dry = run_userpub(path, "janitor", "--dry-run", "--repo", REPO, "--as-of", as_of).stdout
    assert "g/old1" in dry and "solo" in dry and "g/new" not in dry
    # the command refuses a future --as-of for real cleanups; the same cleanup, in-process:
    result = clean(config, REPO, as_of=t1 + 86.4 + 1.5)
    assert (result.cids, result.completed) == (2, True)
    reader = open_reader(config, config.repositories[0])
    assert sorted(reader.cids()) == ["g/new", "g/old2"]
    assert sorted(reader.stamps()) == ["g/old2"]
    root = config.repositories[0].root
    assert root is not None
    check_repository(root)
    userpub_verify(root, config.server.state / "keys" / f"{REPO}.pub", REPO)
    assert stored_now(repo) == reachable_now(repo)
