"""Every hostile tarball class through a real publisher: failed/ with its reason, nothing
written outside the CID directory, and the good tarballs of the same batch still published."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spool import Spool
from spool.names import encode_name
from tests.helpers import make_tarball, run_userpub, write_config
from tests.hostile import CASE_LIMITS, EXPECTED_ERRORS, HOSTILE_CASES
from userpub.config import load_config

REPO = "repo1.example.org"


def listing(root: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        out.update(str((here / n).relative_to(root)) for n in dirnames + filenames)
    return out


def test_every_hostile_class_fails_with_its_reason_and_writes_nothing_outside(tmp_path):
    # small limits so that the bombs stay small; the other cases do not come near them
    path = write_config(tmp_path / "site", repos=1, extra="")
    text = path.read_text().replace("[publisher]\n", "[publisher]\nmax_members = 200\n"
                                    "max_unpacked_bytes = 16777216\n")
    path.write_text(text)
    config = load_config(path)
    for case in CASE_LIMITS.values():
        assert set(case) <= {"max_members", "max_bytes"}
    spool = Spool(config.server.spool)
    spool.ensure_layout()
    made = tmp_path / "made"
    made.mkdir()
    root = config.repositories[0].root
    assert root is not None
    before_outside = listing(tmp_path, skip=(tmp_path / "site", made))
    for name, build in HOSTILE_CASES.items():
        spool.drop_file(build(made), f"hostile/{name}", "attacker")
    good = make_tarball(made / "good.tar.gz", {"ok/file": b"fine"})
    spool.drop_file(good, "hostile/good", "user")
    result = run_userpub(path, "publisher", "--repo", REPO, "--once", timeout=300)
    assert result.returncode == 0, result.stderr

    # the good tarball of the same batch is published; every hostile one failed with its reason
    assert (root / "sw" / "hostile" / "good" / "ok" / "file").read_bytes() == b"fine"
    assert sorted(os.listdir(root / "sw" / "hostile")) == ["good"]
    for name, expected in EXPECTED_ERRORS.items():
        reason_file = config.server.spool / "failed" / encode_name(f"hostile/{name}") / "reason.json"
        reason = json.loads(reason_file.read_text())
        assert expected in reason["error"], (name, reason["error"])
        assert "\n" not in reason["error"]
        assert reason["submitter"] == "attacker"
        answer = run_userpub(path, "status", f"hostile/{name}", check=False)
        status = answer.stdout.strip()
        assert status.startswith("FAILED:") and expected in status, (name, status)
        assert answer.returncode == 6, answer  # the client's exit code for FAILED
    assert spool.depth().incoming == 0

    # nothing outside the CID directories: the repository holds only its own layout, the
    # staging area is empty, and the trash holds only the rejected CID trees (a member that
    # escaped its CID directory would have left the transaction's staging dir non-empty)
    assert set(os.listdir(root)) == {"sw", "ts", ".userpub"}
    assert set(os.listdir(root / ".userpub")) == {"staging", "trash"}
    assert os.listdir(root / ".userpub" / "staging") == []
    trash = os.listdir(root / ".userpub" / "trash")
    assert trash and all(item.endswith(".cid") for item in trash), trash
    assert "not empty after commit" not in result.stderr
    assert listing(tmp_path, skip=(tmp_path / "site", made)) == before_outside
    assert not Path("/tmp/evil.txt").exists()
    assert set(os.listdir(tmp_path / "site")) == {"userpub.toml", "spool", "state", "repos"}
