"""``restore_repository``: what it refuses, and a restore that re-signs the whitelist.

The whole path with real processes (replicator, ingests, the ``userpub restore`` command) is in
``tests/integration/test_replication.py``; here a replica made by the engine is served in-process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from publisher.repositories.cvmfs_native import NativeRepository, init_keys, open_native
from publisher.repositories.cvmfs_native.manifest import Whitelist, fingerprint, split_letter
from publisher.repositories.cvmfs_native.replica import Origin, ReplicaPuller
from publisher.repositories.cvmfs_native.restore import (
    RestoreError,
    restore_repository,
    source_url,
)
from publisher.tarball import UnpackLimits
from tests.helpers import make_tarball, write_config
from tests.unit.test_cvmfs_native_invariants import check_repository, userpub_verify
from tests.unit.test_cvmfs_native_stratum0 import serve_stratum0
from userpub.config import Config, load_config
from userpub.fsutil import remove_tree

REPO = "repo1.example.org"


def site(tmp: Path, *, host: str = "pub1") -> Config:
    return load_config(write_config(tmp / "site", repos=1, server="pub1", hosts={0: host},
                                    backend="cvmfs-native"))


@pytest.fixture
def replicated(tmp_path):
    """pub1's repository with two CIDs, replicated (as pub2 keeps it) and served over HTTP."""
    config = site(tmp_path)
    init_keys(config.server.state / "keys", REPO)
    repo = open_native(config, config.repositories[0])
    repo.recover()
    for cid in ("grp/one", "grp/two"):
        with repo.transaction() as txn:
            txn.add(cid, make_tarball(tmp_path / "t.tgz", {"f": cid.encode()}), "alice",
                    UnpackLimits())
    with repo.transaction() as txn:
        txn.stamp(["grp/one"], "bob")
    replica = tmp_path / "pub2" / REPO
    with serve_stratum0({REPO: repo.root}) as origin:
        ReplicaPuller(Origin(f"{origin}/cvmfs/{REPO}", REPO, repo.key_files.master_public),
                      replica, tmp_path / "pub2.json", durable=False).pull()
    with serve_stratum0({REPO: replica}) as base:
        yield config, repo, f"{base}/cvmfs"


def test_source_urls():
    assert source_url("http://pub2:80/cvmfs/", REPO) == f"http://pub2:80/cvmfs/{REPO}"
    assert source_url(f"http://pub2:80/cvmfs/{REPO}", REPO) == f"http://pub2:80/cvmfs/{REPO}"


def test_refusals_are_one_line_and_change_nothing(replicated, tmp_path):
    config, repo, url = replicated
    revision = repo.manifest().revision
    with pytest.raises(RestoreError, match=r"still exists .* never overwrites one"):
        restore_repository(config, config.repositories[0], url)
    assert repo.manifest().revision == revision
    elsewhere = site(tmp_path / "other", host="pub2")
    with pytest.raises(RestoreError, match="published by pub2, not by this server"):
        restore_repository(elsewhere, elsewhere.repositories[0], url)
    keyless = site(tmp_path / "keyless")
    with pytest.raises(RestoreError, match="without this host's repository keys"):
        restore_repository(keyless, keyless.repositories[0], url)
    assert not (keyless.repositories[0].root / ".cvmfspublished").exists()


def test_a_new_certificate_without_the_master_key_is_refused(replicated, tmp_path):
    _, repo, url = replicated
    other = site(tmp_path / "reinstalled")
    keys = init_keys(other.server.state / "keys", REPO)  # new repository key and certificate
    shutil.copy(repo.key_files.master_public, keys.master_public)  # the same master public key
    keys.master_key.unlink()  # ... but the master key kept offline
    with pytest.raises(RestoreError, match="does not list this host's certificate"):
        restore_repository(other, other.repositories[0], url)
    assert not (other.repositories[0].root / ".cvmfspublished").exists()


def test_restore_with_new_keys_re_signs_the_whitelist(replicated, tmp_path):
    config, repo, url = replicated
    revision = repo.manifest().revision
    cids = sorted(repo.cids())
    stamp = repo.stamped_at("grp/one")
    remove_tree(repo.root)
    keys = repo.key_files
    master, public = keys.master_key.read_bytes(), keys.master_public.read_bytes()
    old_certificate = keys.certificate.read_bytes()
    for path in keys.all():
        path.unlink()
    init_keys(keys.directory, REPO)  # a reinstalled host made new keys ...
    keys.master_key.write_bytes(master)  # ... and got the master key pair back from its safe
    keys.master_public.write_bytes(public)
    assert keys.certificate.read_bytes() != old_certificate
    result = restore_repository(config, config.repositories[0], url)
    assert result.revision == revision and result.whitelist_signed
    restored = NativeRepository(REPO, repo.root, "sw", "ts", f"/cvmfs/{REPO}", keys=keys,
                                durable=False)
    assert sorted(restored.cids()) == cids and restored.stamped_at("grp/one") == stamp
    body, _, _ = split_letter(restored.layout.whitelist.read_bytes())
    ours = fingerprint(keys.certificate.read_bytes())
    assert ours in Whitelist.parse(body).fingerprints
    with restored.transaction() as txn:
        txn.add("grp/three", make_tarball(tmp_path / "3.tgz", {"g": b"3"}), "carol",
                UnpackLimits())
    assert restored.manifest().revision == revision + 1
    check_repository(restored.root)
    userpub_verify(restored.root, keys.master_public, REPO)
