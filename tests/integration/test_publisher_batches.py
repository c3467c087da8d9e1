"""A tarball that breaks its transaction does not take the rest of its batch down with it."""

from __future__ import annotations

import json

from spool import Spool
from spool.names import encode_name
from tests.helpers import Daemon, make_tarball, wait_for, write_config
from userpub.config import load_config

REPO = "repo1.example.org"


def test_a_poisoned_batch_is_retried_one_entry_at_a_time(tmp_path):
    path = write_config(tmp_path / "site", repos=1)
    path.write_text(path.read_text().replace("[publisher]\n", "[publisher]\nmax_attempts = 2\n"))
    config = load_config(path)
    root = config.repositories[0].root
    assert root is not None
    # A file where the group directory "poison" must go: publishing poison/x fails at commit
    # (an environmental failure, not the tarball's fault), failing the whole transaction.
    (root / "sw").mkdir(parents=True)
    (root / "sw" / "poison").write_text("in the way")
    spool = Spool(config.server.spool)
    spool.ensure_layout()
    spool.drop_file(make_tarball(tmp_path / "p.tar.gz", {"f": b"p"}), "poison/x", "someone")
    good = [f"good/{i}" for i in range(5)]
    for i, cid in enumerate(good):
        spool.drop_file(make_tarball(tmp_path / f"g{i}.tar.gz", {"f": str(i).encode()}), cid, "u")
    pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / "pub.log")
    try:
        wait_for(lambda: all((root / "sw" / cid).is_dir() for cid in good), 60, pub.log)
        failed = config.server.spool / "failed" / encode_name("poison/x") / "reason.json"
        wait_for(failed.is_file, 30, pub.log)
        reason = json.loads(failed.read_text())["error"]
        assert reason.startswith("gave up after 2 attempts"), reason
        assert spool.depth().incoming == 0
    finally:
        pub.stop()
