import json
import os
import threading
import time

import pytest

from spool import BadEntry, DropResult, Kind, Spool, State, entry_name
from userpub_client.cid import InvalidCid


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.ensure_layout(("r1", "r2"))
    return s


def drop(spool, cid, data=b"payload", who="alice"):
    with spool.writer(cid, who) as w:
        w.write(data)
        return w.commit()


def test_drop_is_durable_entry_with_metadata(spool):
    assert drop(spool, "grp/abc", b"xyz") is DropResult.QUEUED
    [path] = spool.list_incoming()
    assert path.name == "grp%2Fabc"
    entry = spool.read_entry(path)
    assert (entry.cid, entry.kind, entry.submitter, entry.size) == ("grp/abc", Kind.PUBLISH, "alice", 3)
    assert entry.payload.read_bytes() == b"xyz"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["sha256"] == "3608bca1e44ea6c4d268eb6db02260269892c0b42b86bbf1e77a6fa16c3c9282"
    assert list(spool.tmp.iterdir()) == []


def test_same_cid_twice_is_a_duplicate_and_leaves_nothing(spool):
    assert drop(spool, "a") is DropResult.QUEUED
    assert drop(spool, "a") is DropResult.DUPLICATE
    assert len(spool.list_incoming()) == 1
    assert list(spool.tmp.iterdir()) == []


def test_failed_writer_leaves_nothing(spool):
    with pytest.raises(RuntimeError), spool.writer("a", "x") as w:
        w.write(b"partial")
        raise RuntimeError("client went away")
    assert spool.list_incoming() == [] and list(spool.tmp.iterdir()) == []


def test_invalid_cid_refused_before_writing(spool):
    with pytest.raises(InvalidCid):
        spool.writer("../x", "x")
    assert list(spool.tmp.iterdir()) == []


def test_claim_is_exclusive_across_threads(spool):
    for i in range(50):
        drop(spool, f"c{i}")
    paths = spool.list_incoming()
    wins: dict[str, list] = {"r1": [], "r2": []}

    def worker(repo):
        for p in paths:
            got = spool.claim(p, repo)
            if got is not None:
                wins[repo].append(got.name)

    threads = [threading.Thread(target=worker, args=(r,)) for r in ("r1", "r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins["r1"] + wins["r2"]) == sorted(p.name for p in paths)
    assert not set(wins["r1"]) & set(wins["r2"])


def test_status_through_the_state_machine(spool):
    assert spool.status("x").state is State.UNKNOWN
    drop(spool, "x")
    assert spool.status("x").state is State.QUEUED
    claimed = spool.claim(spool.list_incoming()[0], "r1")
    assert spool.status("x").state is State.PUBLISHING
    spool.fail(spool.read_entry(claimed), "member '../a': path escapes the CID directory")
    status = spool.status("x")
    assert status.state is State.FAILED and "escapes" in status.reason
    reason = json.loads((spool.failed / "x" / "reason.json").read_text())
    assert reason["cid"] == "x" and reason["submitter"] == "alice" and reason["time"] > 0
    # a new upload of the same CID is queued again; a second failure replaces the first
    drop(spool, "x")
    assert spool.status("x").state is State.QUEUED
    spool.fail(spool.read_entry(spool.claim(spool.list_incoming()[0], "r2")), "second")
    assert spool.status("x").reason == "second"
    assert len(list(spool.failed.iterdir())) == 1


def test_complete_and_release(spool):
    drop(spool, "a")
    drop(spool, "b")
    a, b = (spool.read_entry(spool.claim(p, "r1")) for p in spool.list_incoming())
    spool.complete(a)
    spool.release(b)
    assert [p.name for p in spool.list_incoming()] == ["b"]
    assert list(spool.iter_active("r1")) == []


def test_drop_while_publishing_is_a_duplicate(spool):
    drop(spool, "a", b"old")
    entry = spool.read_entry(spool.claim(spool.list_incoming()[0], "r1"))
    assert drop(spool, "a", b"new") is DropResult.DUPLICATE
    assert list(spool.tmp.iterdir()) == []
    spool.release(entry)
    [path] = spool.list_incoming()
    assert spool.read_entry(path).payload.read_bytes() == b"old"


def test_release_when_an_operator_dropped_the_cid_meanwhile(spool):
    drop(spool, "a", b"old")
    entry = spool.read_entry(spool.claim(spool.list_incoming()[0], "r1"))
    (spool.incoming / "a").write_bytes(b"operator's")  # a plain file bypasses every check
    spool.release(entry)
    [path] = spool.list_incoming()
    assert spool.read_entry(path).payload.read_bytes() == b"operator's"
    assert list(spool.iter_active("r1")) == []


def test_recover_returns_claimed_entries_of_one_repo_only(spool):
    for cid in ("a", "b", "c"):
        drop(spool, cid)
    paths = spool.list_incoming()
    spool.claim(paths[0], "r1")
    spool.claim(paths[1], "r1")
    spool.claim(paths[2], "r2")
    assert spool.recover("r1") == 2
    assert sorted(p.name for p in spool.list_incoming()) == ["a", "b"]
    assert [p.name for p in spool.iter_active("r2")] == ["c"]


def test_operator_plain_file_with_suffix(spool, tmp_path):
    src = tmp_path / "upload.tmp"
    src.write_bytes(b"tar")
    os.rename(src, spool.incoming / "grp%2Fcafe.tar.gz")
    assert spool.status("grp/cafe").state is State.QUEUED
    [path] = spool.list_incoming()
    entry = spool.read_entry(path)
    assert entry.cid == "grp/cafe" and entry.kind is Kind.PUBLISH and entry.payload == path
    claimed = spool.claim(path, "r1")
    assert spool.status("grp/cafe").state is State.PUBLISHING
    spool.fail(spool.read_entry(claimed), "not a tar archive")
    assert (spool.failed / "grp%2Fcafe" / "payload").read_bytes() == b"tar"


def test_ignored_and_bad_names(spool):
    (spool.incoming / ".hidden").write_bytes(b"")
    (spool.incoming / "x.part").write_bytes(b"")
    (spool.incoming / "y.tmp").write_bytes(b"")
    assert spool.list_incoming() == []
    (spool.incoming / "a%2Fb%2Fc").write_bytes(b"")
    with pytest.raises(BadEntry, match="at most one"):
        spool.read_entry(spool.incoming / "a%2Fb%2Fc")
    moved = spool.fail(spool.incoming / "a%2Fb%2Fc", "bad name")
    assert (moved / "reason.json").is_file()


def test_stamps_coalesce_and_do_not_block_publishes(spool):
    assert spool.drop_stamp("a", "bob") is DropResult.QUEUED
    assert spool.drop_stamp("a", "carol") is DropResult.DUPLICATE
    assert drop(spool, "a") is DropResult.QUEUED
    names = sorted(p.name for p in spool.list_incoming())
    assert names == ["a", entry_name("a", Kind.STAMP)]
    stamp = spool.read_entry(spool.incoming / entry_name("a", Kind.STAMP))
    assert stamp.kind is Kind.STAMP and stamp.submitter == "bob"


def test_clean_tmp_honours_grace(spool):
    old = spool.tmp / "old"
    old.mkdir()
    (old / "payload").write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old / "payload", (past, past))
    os.utime(old, (past, past))
    fresh = spool.tmp / "fresh"
    fresh.mkdir()
    assert spool.clean_tmp(3600) == 1
    assert not old.exists() and fresh.exists()


def test_depth(spool):
    drop(spool, "a")
    drop(spool, "b")
    drop(spool, "c")
    spool.claim(spool.list_incoming()[0], "r1")
    depth = spool.depth(now=time.time() + 10)
    assert depth.incoming == 2 and depth.active == {"r1": 1, "r2": 0} and depth.failed == 0
    assert depth.oldest_incoming_age >= 10


def test_drop_file_defaults_cid_to_sha256(spool, tmp_path):
    src = tmp_path / "t.tar"
    src.write_bytes(b"hello")
    cid, result = spool.drop_file(src, None, "op")
    assert result is DropResult.QUEUED
    assert cid == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert spool.drop_file(src, None, "op")[1] is DropResult.DUPLICATE
