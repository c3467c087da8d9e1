"""The stratum-1 pull engine against a real stratum 0 served over HTTP (cheroot on loopback).

Every test publishes with the real writer, serves it with the ingest's stratum-0 application and
pulls with :class:`ReplicaPuller`; the replicas are checked by our reader, our verifier and, where
present, the genuine ``cvmfs_swissknife check``.
"""

from __future__ import annotations

import datetime
import os
import random
import shutil
from pathlib import Path

import pytest
from cheroot import wsgi

from ingest.stratum0 import make_stratum0_app
from publisher.repositories.cvmfs_native import NativeReader, NativeRepository, init_keys
from publisher.repositories.cvmfs_native.chunking import ChunkParams
from publisher.repositories.cvmfs_native.keys import load_keys
from publisher.repositories.cvmfs_native.manifest import sign_whitelist, whitelist_body
from publisher.repositories.cvmfs_native.objects import ObjectStore
from publisher.repositories.cvmfs_native.replica import (
    Origin,
    PullInterruptedError,
    ReplicaError,
    ReplicaPuller,
)
from publisher.repositories.cvmfs_native.replica_gc import collect_replica, reachable_names
from publisher.repositories.cvmfs_native.replica_state import MAX_RETAINED, ReplicaState, Retained
from publisher.tarball import UnpackLimits
from tests.cvmfs_genuine import genuine_check, genuine_scrub
from tests.helpers import make_tarball
from tests.unit.test_cvmfs_native_invariants import (
    all_objects_hash_to_their_names,
    check_repository,
    userpub_verify,
)
from tests.unit.test_cvmfs_native_stratum0 import serve_stratum0

FQRN = "repo.example.org"
SMALL_CHUNKS = ChunkParams(64 << 10, 128 << 10, 256 << 10)


def objects(root: Path) -> dict[str, bytes]:
    """``<hex><suffix>`` -> stored bytes of every object below ``root/data``."""
    out = {}
    for sub in sorted((root / "data").iterdir()):
        if sub.name != "txn":
            out.update({sub.name + f.name: f.read_bytes() for f in sub.iterdir()})
    return out


def publish(repo: NativeRepository, tmp: Path, cid: str, files: dict[str, bytes]) -> None:
    with repo.transaction() as txn:
        txn.add(cid, make_tarball(tmp / f"{cid.replace('/', '_')}.tgz", files), "alice",
                UnpackLimits())


@pytest.fixture
def origin(tmp_path):
    keys = init_keys(tmp_path / "keys", FQRN)
    repo = NativeRepository(FQRN, tmp_path / "s0" / FQRN, "sw", "ts", f"/cvmfs/{FQRN}",
                            keys=keys, durable=False, chunk_params=SMALL_CHUNKS)
    repo.recover()
    rng = random.Random(15)
    publish(repo, tmp_path, "grp/one", {"bin/run.sh": b"#!/bin/sh\necho one\n",
                                        "lib/big.bin": rng.randbytes(700_000), "empty": b""})
    publish(repo, tmp_path, "solo", {"README": b"a CID without a group\n"})
    with repo.transaction() as txn:
        txn.stamp(["grp/one"], "bob")
    with serve_stratum0({FQRN: repo.root}) as base:
        yield repo, f"{base}/cvmfs/{FQRN}"


def puller(tmp_path: Path, repo: NativeRepository, url: str, **kwargs: object) -> ReplicaPuller:
    return ReplicaPuller(Origin(url, FQRN, repo.key_files.master_public),
                         tmp_path / "s1" / FQRN, tmp_path / "state" / f"{FQRN}.json",
                         durable=False, retries=2, **kwargs)  # type: ignore[arg-type]


def reader(root: Path) -> NativeReader:
    return NativeReader(FQRN, root, "sw", "ts", f"/cvmfs/{FQRN}")


def test_first_pull_is_a_byte_for_byte_stratum_1(origin, tmp_path):
    repo, url = origin
    result = puller(tmp_path, repo, url).pull()
    s1 = tmp_path / "s1" / FQRN
    assert result.changed and result.previous is None
    assert result.revision == repo.manifest().revision == result.origin_revision
    assert result.bytes > 700_000 and result.catalogs >= 4
    wanted = objects(repo.root)
    reached = reachable_names(repo.store, [repo.manifest().root_catalog])
    got = objects(s1)
    assert reached <= set(got)  # every object of the current revision, chunks included
    assert any(name.endswith("P") for name in reached)
    assert all(got[name] == wanted[name] for name in got)  # never recompressed
    for name in (".cvmfspublished", ".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_master_replica"):
        assert (s1 / name).read_bytes() == (repo.root / name).read_bytes()
        assert not (s1 / name).is_symlink()
    assert not (s1 / ".userpub").exists() and not any((s1 / "data" / "txn").iterdir())
    assert (s1 / ".cvmfs_last_snapshot").read_text().endswith("UTC " + (
        (s1 / ".cvmfs_last_snapshot").read_text().split()[-1]) + "\n")
    all_objects_hash_to_their_names(s1)
    check_repository(s1)
    userpub_verify(s1, repo.key_files.master_public, FQRN)  # every tagged revision too
    ours, theirs = reader(s1), reader(repo.root)
    assert sorted(ours.cids()) == sorted(theirs.cids()) == ["grp/one", "solo"]
    assert ours.stamped_at("grp/one") == theirs.stamped_at("grp/one") is not None
    assert ours.size_of("grp/one") == theirs.size_of("grp/one") > 700_000
    state = ReplicaState.load(tmp_path / "state" / f"{FQRN}.json", FQRN)
    assert state.revision == result.revision and state.last_success > 0 and not state.last_error


def test_the_genuine_check_accepts_the_replica_on_disk_and_over_http(origin, tmp_path):
    repo, url = origin
    puller(tmp_path, repo, url).pull()
    s1 = tmp_path / "s1" / FQRN
    genuine_check(s1, tmp_path / "check-dir")
    genuine_scrub(s1 / "data")
    with serve_stratum0({FQRN: s1}) as base:
        genuine_check(f"{base}/cvmfs/{FQRN}", tmp_path / "check-http", fqrn=FQRN,
                      key=repo.key_files.master_public)


def test_a_pull_fetches_only_what_changed(origin, tmp_path):
    repo, url = origin
    pull = puller(tmp_path, repo, url)
    pull.pull()
    s1 = tmp_path / "s1" / FQRN
    again = pull.pull()
    assert not again.changed and again.objects == 0 and again.revision == again.previous
    before = set(objects(repo.root))
    publish(repo, tmp_path, "grp/two", {"new.txt": b"only this is new\n"})
    new = set(objects(repo.root)) - before
    result = pull.pull()
    assert result.changed and result.previous == again.revision
    assert result.revision == repo.manifest().revision
    assert result.objects == len(new)  # the new revision's objects, nothing else
    have = set(objects(s1))
    assert new <= have <= before | new
    assert all(name.endswith("H") for name in before - have)  # histories of older revisions
    assert reader(s1).contains("grp/two")
    check_repository(s1)
    assert "  published revision" not in result.describe() and "->" in result.describe()


def test_a_revision_older_than_the_replica_is_refused(origin, tmp_path):
    repo, url = origin
    older = tmp_path / "older" / FQRN
    shutil.copytree(repo.root, older, symlinks=True)
    publish(repo, tmp_path, "grp/two", {"f": b"x"})
    puller(tmp_path, repo, url).pull()
    s1 = tmp_path / "s1" / FQRN
    served = (s1 / ".cvmfspublished").read_bytes()
    with serve_stratum0({FQRN: older}) as base, pytest.raises(
            ReplicaError, match=r"older than the replica's .*refusing to go back"):
        puller(tmp_path, repo, f"{base}/cvmfs/{FQRN}").pull()
    assert (s1 / ".cvmfspublished").read_bytes() == served
    state = ReplicaState.load(tmp_path / "state" / f"{FQRN}.json", FQRN)
    assert "refusing to go back" in state.last_error and "\n" not in state.last_error


def test_an_untrusted_origin_is_refused_and_nothing_installed(origin, tmp_path):
    repo, url = origin
    other = init_keys(tmp_path / "other-keys", FQRN)
    s1 = tmp_path / "s1" / FQRN
    state = tmp_path / "state" / f"{FQRN}.json"
    strange = ReplicaPuller(Origin(url, FQRN, other.master_public), s1, state, durable=False)
    with pytest.raises(ReplicaError, match="whitelist signature"):
        strange.pull()
    assert not (s1 / ".cvmfspublished").exists()
    wrong_name = ReplicaPuller(Origin(url, "other.example.org", repo.key_files.master_public),
                               tmp_path / "s1" / "other", state, durable=False)
    with pytest.raises(ReplicaError, match=r"manifest of 'repo\.example\.org', not of other"):
        wrong_name.pull()
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    late = puller(tmp_path, repo, url, clock=future.timestamp)
    with pytest.raises(ReplicaError, match="expired at"):
        late.pull()
    # a whitelist validly signed by the master key that does not list the certificate
    master = load_keys(repo.key_files).master_key
    body = whitelist_body(FQRN, ["AA:" * 19 + "AA"],
                          datetime.datetime.now(datetime.UTC).replace(microsecond=0),
                          datetime.timedelta(days=30))
    saved = repo.layout.whitelist.read_bytes()
    repo.layout.whitelist.write_bytes(sign_whitelist(body, master))
    with pytest.raises(ReplicaError, match="does not list the certificate"):
        puller(tmp_path, repo, url).pull()
    repo.layout.whitelist.write_bytes(saved)
    # a manifest whose body was altered after signing
    manifest_file = repo.root / ".userpub" / "current" / ".cvmfspublished"
    signed = manifest_file.read_bytes()
    manifest_file.write_bytes(signed.replace(b"\nD240\n", b"\nD241\n"))
    with pytest.raises(ReplicaError, match="manifest hash does not match"):
        puller(tmp_path, repo, url).pull()
    manifest_file.write_bytes(signed)
    assert not (s1 / ".cvmfspublished").exists()
    assert puller(tmp_path, repo, url).pull().revision == repo.manifest().revision


def test_never_advances_without_every_object(origin, tmp_path):
    repo, url = origin
    pull = puller(tmp_path, repo, url)
    first = pull.pull()
    s1 = tmp_path / "s1" / FQRN
    served = (s1 / ".cvmfspublished").read_bytes()
    before = set(objects(repo.root))
    publish(repo, tmp_path, "grp/two", {"a": b"content of a\n", "b": b"content of b\n"})
    new_files = sorted(n for n in set(objects(repo.root)) - before if n[-1] in "0123456789abcdef")
    victim = repo.store.path(new_files[0][:40])
    kept = victim.read_bytes()
    victim.unlink()
    with pytest.raises(ReplicaError, match=r"HTTP 404 \(not on the origin\)"):
        pull.pull()
    assert (s1 / ".cvmfspublished").read_bytes() == served
    assert not reader(s1).contains("grp/two")
    victim.write_bytes(b"not what the name says")
    with pytest.raises(ReplicaError, match="not to its name"):
        pull.pull()
    assert (s1 / ".cvmfspublished").read_bytes() == served
    victim.write_bytes(kept)
    result = pull.pull()
    assert result.previous == first.revision and reader(s1).contains("grp/two")
    check_repository(s1)


def test_a_stop_request_interrupts_and_installs_nothing(origin, tmp_path):
    repo, url = origin
    calls = []

    def stop_at_the_third_check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(PullInterruptedError):
        puller(tmp_path, repo, url, should_stop=stop_at_the_third_check).pull()
    s1 = tmp_path / "s1" / FQRN
    assert not (s1 / ".cvmfspublished").exists()
    assert not any((s1 / "data" / "txn").iterdir())
    result = puller(tmp_path, repo, url).pull()  # goes on with what it already has
    assert result.revision == repo.manifest().revision
    check_repository(s1)


def test_the_origin_publishing_during_a_pull_is_followed(origin, tmp_path):
    """The reflog fetched after the walk belongs to a newer revision: the pull goes on to it."""
    repo, _ = origin
    inner = make_stratum0_app({FQRN: repo.root})
    published: list[int] = []

    def app(environ, start_response):
        if environ["PATH_INFO"].endswith("/.cvmfsreflog") and not published:
            publish(repo, tmp_path, "grp/during", {"f": b"published mid-pull\n"})
            published.append(repo.manifest().revision)
        return inner(environ, start_response)

    server = wsgi.Server(("127.0.0.1", 0), app, numthreads=4)
    server.prepare()
    import threading

    thread = threading.Thread(target=server.serve)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.bind_addr[1]}/cvmfs/{FQRN}"
        result = puller(tmp_path, repo, url).pull()
    finally:
        server.stop()
        thread.join(10)
    assert published and result.revision == published[0]
    s1 = tmp_path / "s1" / FQRN
    assert reader(s1).contains("grp/during")
    check_repository(s1)


def test_garbage_collection_follows_the_origin_with_a_grace(origin, tmp_path):
    repo, url = origin
    pull = puller(tmp_path, repo, url)
    pull.pull()
    s1 = tmp_path / "s1" / FQRN
    state = tmp_path / "state" / f"{FQRN}.json"
    doomed = {n for n in reachable_names(repo.store, [repo.manifest().root_catalog])}
    with repo.transaction() as txn:
        txn.remove(["grp/one"], ["grp/one"])
    pull.pull()
    collector = NativeRepository(FQRN, repo.root, "sw", "ts", f"/cvmfs/{FQRN}",
                                 keys=repo.key_files, durable=False, keep_hours=0)
    collector.gc()  # the origin forgets every revision but the current one
    result = pull.pull()
    assert result.origin_last_gc
    current = reachable_names(repo.store, [repo.manifest().root_catalog])
    gone = doomed - current
    assert gone and gone <= set(objects(s1))
    # within the grace the revision replaced last stays whole; the older ones go
    now = os.path.getmtime(s1 / ".cvmfspublished") + 10
    first = collect_replica(s1, state, FQRN, grace=3600, clock=lambda: now + 7200,
                            origin_last_gc=result.origin_last_gc)
    assert first.removed > 0
    have = set(objects(s1))
    assert current <= have
    second = collect_replica(s1, state, FQRN, grace=3600, clock=lambda: now + 4 * 3600)
    have = set(objects(s1))
    assert current <= have and not (gone & have)
    assert second.removed + first.removed >= len(gone)
    check_repository(s1)
    userpub_verify(s1, repo.key_files.master_public, FQRN)
    assert not reader(s1).contains("grp/one") and reader(s1).contains("solo")
    assert pull.pull().objects == 0  # collected, still complete


def test_the_grace_keeps_the_replaced_revision_readable(origin, tmp_path):
    repo, url = origin
    pull = puller(tmp_path, repo, url)
    pull.pull()
    s1 = tmp_path / "s1" / FQRN
    old_root = reader(s1).manifest().root_catalog
    with repo.transaction() as txn:
        txn.remove(["grp/one"], ["grp/one"])
    collector = NativeRepository(FQRN, repo.root, "sw", "ts", f"/cvmfs/{FQRN}",
                                 keys=repo.key_files, durable=False, keep_hours=0)
    collector.gc()
    pull.pull()
    state = tmp_path / "state" / f"{FQRN}.json"
    retained = ReplicaState.load(state, FQRN).retained
    assert [r.root_catalog for r in retained][-1] == old_root
    later = os.path.getmtime(s1 / ".cvmfspublished") + 7200  # objects are old, grace is not
    collect_replica(s1, state, FQRN, grace=3 * 3600, clock=lambda: later)
    assert reachable_names(ObjectStore(s1), [old_root])  # still complete: it raises otherwise


def test_the_record_survives_damage_and_keeps_a_bounded_history(tmp_path):
    path = tmp_path / "replicas" / f"{FQRN}.json"
    assert ReplicaState.load(path, FQRN) == ReplicaState(FQRN)  # missing
    path.parent.mkdir()
    path.write_text("{not json")
    assert ReplicaState.load(path, FQRN) == ReplicaState(FQRN)  # damaged
    state = ReplicaState(FQRN, revision=7, last_success=100.0)
    for i in range(MAX_RETAINED + 5):
        state.retain(Retained(i, f"{i:040x}", (f"{i:040x}H",), until=1000.0 + i), now=500.0)
    assert [r.revision for r in state.retained] == list(range(5, MAX_RETAINED + 5))
    state.retain(Retained(99, "f" * 40, (), until=2000.0), now=1010.0)  # graces ended
    assert [r.revision for r in state.retained] == [*range(11, MAX_RETAINED + 5), 99]
    state.save(path)
    again = ReplicaState.load(path, FQRN)
    assert again == state and again.age(130.0) == 30.0
    assert ReplicaState(FQRN).age(130.0) is None
