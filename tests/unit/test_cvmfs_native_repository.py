"""The cvmfs-native backend through the Repository protocol, in-process."""

from __future__ import annotations

import datetime
import json
import os
import random
import time

import pytest

from publisher.repositories import open_reader, open_repository
from publisher.repositories.base import RepositoryError
from publisher.repositories.cvmfs_native import NativeReader, NativeRepository, init_keys
from publisher.repositories.cvmfs_native.chunking import ChunkParams
from publisher.repositories.cvmfs_native.manifest import Whitelist, split_letter
from publisher.tarball import UnpackLimits
from publisher.tarball.decompress import UnpackError
from publisher.tarball.unpack import unpack
from tests.hostile import HOSTILE_CASES, dir_, hard, reg, sym
from tests.hostile import tar_bytes as hostile_tar
from tests.unit.test_cvmfs_native_invariants import (
    check_repository,
    cid_listing,
    load_object,
    manifest_fields,
    open_catalog,
    userpub_verify,
)
from userpub.config import load_config

FQRN = "repo.example.org"
LIMITS = UnpackLimits()


def tarball(path, files, mode="w:gz"):
    from tests.helpers import make_tarball

    return make_tarball(path, files, mode)


@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys"), FQRN)


@pytest.fixture
def repo(tmp_path, key_files):
    r = NativeRepository(FQRN, tmp_path / "srv" / FQRN, "sw", "ts", f"/cvmfs/{FQRN}",
                         keys=key_files, durable=False, keep_hours=0)
    r.recover()
    return r


def revision(repo):
    return repo.manifest().revision


def test_open_repository_and_reader_from_configuration(tmp_path):
    from tests.helpers import run_userpub, write_config

    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native")
    run_userpub(path, "keys", "init", "repo1.example.org")
    config = load_config(path)
    repo = open_repository(config, config.repositories[0])
    assert isinstance(repo, NativeRepository)
    repo.recover()
    with repo.transaction() as txn:
        txn.add("g/c1", tarball(tmp_path / "a.tgz", {"f": b"x"}), "me", LIMITS)
    reader = open_reader(config, config.repositories[0])
    assert isinstance(reader, NativeReader) and reader.contains("g/c1")
    assert reader.visible_path("g/c1") == "/cvmfs/repo1.example.org/sw/g/c1"
    assert run_userpub(path, "status", "g/c1").stdout.strip() == \
        "PRESENT:/cvmfs/repo1.example.org/sw/g/c1"
    assert (tmp_path / "site/repos/info/v1/repositories.json").read_text().count(
        '"name": "repo1.example.org"') == 1


def test_reader_answers_from_the_published_revision(repo, tmp_path):
    t = tarball(tmp_path / "a.tgz", {"bin/x": b"1234", "lib/y": b"56"})
    before = time.time()
    with repo.transaction() as txn:
        txn.add("g/one", t, "alice", LIMITS)
        txn.add("solo", t, "bob", LIMITS)
        assert not repo.contains("g/one")  # not before the commit
        txn.stamp(["g/one"], "carol")
    assert repo.contains("g/one") and repo.contains("solo")
    assert not repo.contains("g") and not repo.contains("g/two") and not repo.contains("x")
    assert sorted(repo.cids()) == ["g/one", "solo"]
    assert list(repo.stamps()) == ["g/one"]
    assert before - 1 <= repo.published_at("solo") <= time.time()
    assert before - 1 <= repo.stamped_at("g/one") <= time.time()
    assert repo.stamped_at("solo") is None and repo.published_at("nope") is None
    assert repo.size_of("solo") == 6 + len(b"bob\n")  # files plus the publisher record
    stamp_time = repo.stamped_at("g/one")
    time.sleep(1.1)
    with repo.transaction() as txn:
        txn.stamp(["g/one", "solo"], "dave")
    assert repo.stamped_at("g/one") > stamp_time
    assert sorted(repo.stamps()) == ["g/one", "solo"]


def test_revision_increases_and_empty_transactions_publish_nothing(repo, tmp_path):
    first = revision(repo)
    with repo.transaction():
        pass
    assert revision(repo) == first
    with repo.transaction() as txn:
        txn.add("a", tarball(tmp_path / "a.tgz", {"f": b"x"}), "me", LIMITS)
    assert revision(repo) == first + 1
    repo.gc()
    assert revision(repo) == first + 2
    with repo.transaction() as txn:
        txn.remove(["a"])
    assert revision(repo) == first + 3
    check_repository(repo.root)


def test_unpack_error_leaves_the_transaction_usable(repo, tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(HOSTILE_CASES["traversal"](tmp_path).read_bytes())
    good = tarball(tmp_path / "good.tgz", {"ok": b"fine"})
    with repo.transaction() as txn:
        with pytest.raises(UnpackError, match="escapes the CID directory"):
            txn.add("bad", bad, "me", LIMITS)
        txn.add("good", good, "me", LIMITS)
    assert repo.contains("good") and not repo.contains("bad")
    check_repository(repo.root)


def test_exception_in_a_transaction_publishes_nothing_and_gc_reclaims(repo, tmp_path):
    base = repo.manifest()
    data = random.Random(1).randbytes(200_000)
    with pytest.raises(RuntimeError), repo.transaction() as txn:
        txn.add("x", tarball(tmp_path / "x.tgz", {"big": data}), "me", LIMITS)
        raise RuntimeError("abort")
    assert repo.manifest() == base and not repo.contains("x")
    assert not list((repo.root / "data" / "txn").iterdir())
    repo.gc()
    published = check_repository(repo.root).files
    assert set(published) == {b"/sw/.cvmfscatalog", b"/ts/.cvmfscatalog"}
    assert stored_now(repo) == reachable_now(repo)  # the aborted CID's objects are gone


def reachable_now(repo):
    """Objects reachable from every tag of the history plus the manifest's own objects."""
    import sqlite3

    fields = manifest_fields(repo.root)
    names = {fields["H"] + "H", fields["X"] + "X", fields["M"] + "M"}
    history = sqlite3.connect(":memory:")
    history.deserialize(load_object(repo.root, fields["H"], "H"))
    stack = [h for (h,) in history.execute("SELECT hash FROM tags")]
    while stack:
        h = stack.pop()
        if h + "C" in names:
            continue
        names.add(h + "C")
        conn, _ = open_catalog(repo.root, h)
        names.update(bytes(b).hex() for (b,) in conn.execute(
            "SELECT hash FROM catalog WHERE hash IS NOT NULL"))
        names.update(bytes(b).hex() + "P" for (b,) in conn.execute("SELECT hash FROM chunks"))
        stack.extend(s for (s,) in conn.execute("SELECT sha1 FROM nested_catalogs"))
    return names


def stored_now(repo):
    return {sub.name + p.name for sub in (repo.root / "data").iterdir() if sub.name != "txn"
            for p in sub.iterdir()}


def test_gc_removes_exactly_the_unreachable_objects(tmp_path, key_files):
    repo = NativeRepository(FQRN, tmp_path / "srv", "sw", "ts", f"/cvmfs/{FQRN}", keys=key_files,
                            durable=False, keep_hours=0,
                            chunk_params=ChunkParams(64 << 10, 128 << 10, 256 << 10))
    repo.recover()
    rng = random.Random(2)
    shared = rng.randbytes(700_000)
    for i in range(5):
        files = {"shared.bin": shared, f"own{i}.bin": rng.randbytes(300_000 + i),
                 "common.txt": b"same in all\n"}
        with repo.transaction() as txn:
            txn.add(f"g/c{i}", tarball(tmp_path / f"{i}.tgz", files), "me", LIMITS)
            txn.stamp([f"g/c{i}"], "me")
    with repo.transaction() as txn:
        result = txn.remove(["g/c0", "g/c1", "nope"], ["g/c0"])
    assert (result.cids, result.stamps) == (2, 1) and result.bytes_freed > 600_000
    before = stored_now(repo)
    gc = repo.gc()
    after = stored_now(repo)
    assert after == reachable_now(repo)  # nothing unreachable is left ...
    fields = manifest_fields(repo.root)
    assert after - before == {fields["C"] + "C", fields["H"] + "H"}  # the GC revision's own
    assert gc.bytes_freed > 600_000  # ... and the removed CIDs' objects went
    assert sorted(repo.cids()) == ["g/c2", "g/c3", "g/c4"]
    status = json.loads((repo.root / ".cvmfs_status.json").read_text())
    assert time.strptime(status["last_gc"], "%a %b %d %H:%M:%S %Z %Y")
    check_repository(repo.root)
    userpub_verify(repo.root, key_files.master_public)
    # every CID still reads back whole
    checked = check_repository(repo.root)
    for i in (2, 3, 4):
        listing = cid_listing(checked, f"/sw/g/c{i}".encode())
        assert listing["shared.bin"] == shared and len(listing[f"own{i}.bin"]) == 300_000 + i


def test_gc_keeps_revisions_within_the_window(tmp_path, key_files):
    repo = NativeRepository(FQRN, tmp_path / "srv", "sw", "ts", f"/cvmfs/{FQRN}", keys=key_files,
                            durable=False, keep_hours=1)
    repo.recover()
    with repo.transaction() as txn:
        txn.add("a", tarball(tmp_path / "a.tgz", {"f": b"only in a"}), "me", LIMITS)
    with repo.transaction() as txn:
        txn.remove(["a"])
    before = stored_now(repo)
    repo.gc()
    assert stored_now(repo) >= before - {n for n in before if n.endswith("H")}
    assert stored_now(repo) == reachable_now(repo)


def test_cid_and_group_names_do_not_collide(repo, tmp_path):
    t = tarball(tmp_path / "a.tgz", {"f": b"x"})
    with repo.transaction() as txn:
        txn.add("grp/a", t, "me", LIMITS)
        txn.add("solo", t, "me", LIMITS)
    with repo.transaction() as txn:
        with pytest.raises(UnpackError, match="conflicts with the group"):
            txn.add("grp", t, "me", LIMITS)
        with pytest.raises(UnpackError, match="conflicts with the published cid solo"):
            txn.add("solo/x", t, "me", LIMITS)
        txn.add("new", t, "me", LIMITS)
        with pytest.raises(UnpackError, match="conflicts"):
            txn.add("new/x", t, "me", LIMITS)
    assert sorted(repo.cids()) == ["grp/a", "new", "solo"]


def test_republishing_a_present_cid_keeps_the_first(repo, tmp_path):
    with repo.transaction() as txn:
        txn.add("c", tarball(tmp_path / "1.tgz", {"f": b"first"}), "me", LIMITS)
    with repo.transaction() as txn:
        txn.add("c", tarball(tmp_path / "2.tgz", {"f": b"second"}), "me", LIMITS)
    assert cid_listing(check_repository(repo.root), b"/sw/c")["f"] == b"first"


def test_recover_discards_interrupted_writes(repo, tmp_path):
    base = repo.manifest()
    txn_dir = repo.root / "data" / "txn"
    (txn_dir / "obj.123.4.5").write_bytes(b"partial")
    future = repo.layout.generations / f"{base.revision + 1:012d}"
    future.mkdir()
    (future / ".cvmfspublished").write_bytes(b"half")
    (repo.layout.work / "current.000000000099.tmp").symlink_to("gen/x")
    repo.recover()
    assert not list(txn_dir.iterdir()) and not future.exists()
    assert not list(repo.layout.work.glob("current.*.tmp"))
    assert repo.manifest() == base
    check_repository(repo.root)


def test_layout_links_and_replication_marker(repo):
    root = repo.root
    assert os.readlink(root / ".cvmfspublished") == ".userpub/current/.cvmfspublished"
    assert os.readlink(root / ".cvmfsreflog") == ".userpub/current/.cvmfsreflog"
    assert (root / ".cvmfs_master_replica").read_text().startswith("This file marks")
    assert sorted(p.name for p in (root / "data").iterdir())[:2] == ["00", "01"]
    assert len(list((root / "data").iterdir())) == 257


def test_whitelist_is_resigned_before_it_expires(repo, key_files):
    def whitelist():
        body, _, _ = split_letter(repo.layout.whitelist.read_bytes())
        return Whitelist.parse(body)

    first = whitelist()
    now = datetime.datetime.now(datetime.UTC)
    assert not repo.ensure_whitelist(now)
    assert repo.ensure_whitelist(now + datetime.timedelta(days=16))
    assert whitelist().expires > first.expires + datetime.timedelta(days=15)
    userpub_verify(repo.root, key_files.master_public)


def test_without_the_master_key_an_expired_whitelist_stops_publishing(tmp_path):
    files = init_keys(tmp_path / "keys", FQRN)
    repo = NativeRepository(FQRN, tmp_path / "srv", "sw", "ts", f"/cvmfs/{FQRN}", keys=files,
                            durable=False, whitelist_days=1)
    repo.recover()
    files.master_key.rename(tmp_path / "offline.masterkey")
    repo = NativeRepository(FQRN, tmp_path / "srv", "sw", "ts", f"/cvmfs/{FQRN}", keys=files,
                            durable=False, whitelist_days=1)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    with pytest.raises(RepositoryError, match="master key is not available"):
        repo.ensure_whitelist(later)


def test_large_file_is_chunked_with_the_default_sizes(repo, tmp_path):
    data = random.Random(7).randbytes(40 << 20)
    t = tarball(tmp_path / "big.tar", {"big.bin": data, "small": b"s"}, mode="w")
    with repo.transaction() as txn:  # a big payload: stored by worker processes
        txn.add("big", t, "me", LIMITS)
    checked = check_repository(repo.root)
    assert checked.files[b"/sw/big/big.bin"] == data
    conn, _ = open_catalog(repo.root, _catalog_of(repo, "big"))
    sizes = [s for (s,) in conn.execute("SELECT size FROM chunks ORDER BY offset")]
    assert len(sizes) >= 3 and sum(sizes) == len(data)
    assert all(4 << 20 <= s <= 16 << 20 for s in sizes[:-1])


def _catalog_of(repo, cid):
    return repo.catalog_of(repo.cid_path(cid), into=True)


QUIRKS = [  # valid archives with surprises: both backends must show the same tree
    [dir_("./"), reg("./a/b"), reg("a//c", b"c"), reg("a/./d", b"d")],
    [reg("f", b"1"), reg("f", b"2"), sym("s", "f"), sym("s", "a/b"), reg("a/b", b"x")],
    [reg("f", b"1"), hard("h", "f"), reg("f", b"replaced"), hard("h2", "h")],
    [dir_("d/", 0o500), reg("d/x", b"ro dir"), dir_("e/", 0o777)],
    [reg("x" * 120 + "/" + "y" * 120, b"long"), sym("l", "x" * 120 + "/" + "y" * 120)],
    [dir_("a/b/"), sym("a/b/up", ".."), sym("z", "a/b/up/b/up/b"), reg("a/f", b"")],
]


@pytest.mark.parametrize("entries", QUIRKS, ids=range(len(QUIRKS)))
def test_valid_quirky_tarballs_give_the_tree_unpack_gives(entries, repo, tmp_path):
    from tests.helpers import tree_listing

    src = tmp_path / "q.tar"
    src.write_bytes(hostile_tar(entries))
    unpack(src, tmp_path / "dest")
    with repo.transaction() as txn:
        txn.add("q", src, "me", LIMITS)
    checked = check_repository(repo.root)
    native = cid_listing(checked, b"/sw/q")
    del native[".cvmfscatalog"], native[".publisher"]
    assert native == tree_listing(tmp_path / "dest")
    for rel in native:
        expect = os.lstat(tmp_path / "dest" / rel).st_mode
        assert checked.modes[b"/sw/q/" + rel.encode()] == expect, rel
