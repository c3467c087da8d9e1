"""Full disks: the spool on a small tmpfs, and a repository on a small tmpfs.

* Spool full: uploads beyond the room get ``507`` (announced sizes before anything is read,
  chunked ones when the disk fills up), whatever races between concurrent uploads; every
  upload answered ``OK`` is kept and published; ``tmp/`` holds nothing of the refused ones.
* Repository full during unpacking: the transaction aborts, no reader ever sees a partial
  CID, the entry is retried, publishes once the operator made room, and fails with the
  reason (``No space left on device``) after ``max_attempts``.

The tests mount tmpfs filesystems (root only; they skip with the reason elsewhere).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from spool import Spool
from tests.helpers import Daemon, make_tarball, wait_for, write_config
from tests.integration.test_hostile_support import (
    MIB,
    REPO1,
    Api,
    CidWatcher,
    IngestDaemon,
    expected_listing,
    leftovers,
    listing,
    tmpfs,
    tune,
)
from tests.pki import TestPKI, ingest_config
from userpub.config import load_config

INSUFFICIENT = "Insufficient storage in the spool, try again later\n"


def random_tarball(path: Path, size: int) -> tuple[Path, dict[str, bytes]]:
    """A gzip tarball of incompressible files, ``size`` bytes of content in all."""
    files = {f"data/part{i}.bin": os.urandom(size // 4) for i in range(4)}
    return make_tarball(path, files), files


def test_spool_full_uploads_get_507_and_nothing_accepted_is_lost(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "pki")
    config = ingest_config(tmp_path / "site", pki, http=False, repos=1, threads=12,
                           spool_reserve_bytes=4 * MIB)
    tarballs = {f"grp/big{i}": random_tarball(tmp_path / f"b{i}.tar.gz", 5 * MIB)
                for i in range(8)}
    answers: dict[str, tuple[int, str]] = {}
    with tmpfs(config.server.spool, "32m", "the spool-full test"):
        ingest = IngestDaemon(config.path, tmp_path / "ingest.log")
        api = Api(ingest.https, pki)
        spool = Spool(config.server.spool)
        try:
            def upload(cid: str) -> None:
                path = tarballs[cid][0]
                if cid.endswith(("6", "7")):  # chunked: the size is not known beforehand
                    data: object = (path.read_bytes()[i:i + MIB]
                                    for i in range(0, path.stat().st_size, MIB))
                    r = api.publish(cid, data)
                else:
                    with path.open("rb") as fh:
                        r = api.publish(cid, fh)
                answers[cid] = (r.status_code, r.text)

            threads = [threading.Thread(target=upload, args=(cid,)) for cid in tarballs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            accepted = sorted(c for c, a in answers.items() if a == (200, "OK\n"))
            refused = sorted(c for c, a in answers.items() if a == (507, INSUFFICIENT))
            assert sorted(accepted + refused) == sorted(tarballs), answers
            assert accepted and len(refused) >= 2, answers  # 8 x 5 MiB for 28 MiB of room
            # the refused left nothing; each accepted one is queued whole
            wait_for(lambda: os.listdir(spool.tmp) == [], 15, ingest.log)
            for cid in accepted:
                entry = spool.read_entry(spool.incoming / cid.replace("/", "%2F"))
                assert entry.payload.read_bytes() == tarballs[cid][0].read_bytes()
            for cid in refused:
                assert api.text("status", cid) == "MISSING\n"

            # the publisher takes the accepted ones away; the room is back for the others
            publisher = Daemon(config.path, "publisher", "--repo", REPO1,
                               log=tmp_path / "publisher.log")
            try:
                present = "PRESENT:/cvmfs/repo1.example.org/sw/{}\n"
                wait_for(lambda: all(api.text("status", c) == present.format(c)
                                     for c in accepted), 60, publisher.log)
                for cid in refused:  # the users try again
                    with tarballs[cid][0].open("rb") as fh:
                        assert api.publish(cid, fh).text == "OK\n"
                    wait_for(lambda: api.text("status", cid) == present.format(cid), 60,  # noqa: B023
                             publisher.log)
            finally:
                publisher.stop()
        finally:
            ingest.stop()
        root = config.repositories[0].root
        assert root is not None
        for cid, (_, files) in tarballs.items():
            assert (root / "sw" / cid / "data/part0.bin").read_bytes() == files["data/part0.bin"]
            assert listing(root / "sw" / cid) == expected_listing(files)
        assert [n for n in leftovers(config) if "/trash/" not in n] == []


class RepoOnTmpfs:
    """A one-repository site whose repository root is a small tmpfs."""

    def __init__(self, tmp_path: Path, size: str, max_attempts: int) -> None:
        self.path = write_config(tmp_path / "site", repos=1)
        tune(self.path, "publisher", max_attempts=max_attempts, rescan_seconds=0.5)
        self.config = load_config(self.path)
        root = self.config.repositories[0].root
        assert root is not None
        self.root = root
        self.size = size
        self.spool = Spool(self.config.server.spool)
        self.spool.ensure_layout()
        self.contents: dict[str, dict[str, bytes]] = {}
        self.tmp_path = tmp_path

    def mounted(self) -> Iterator[Path]:
        return tmpfs(self.root, self.size, "the repository-full test")  # type: ignore[return-value]

    def drop(self, cid: str, size: int) -> None:
        path, files = random_tarball(self.tmp_path / f"{cid.replace('/', '_')}.tar.gz", size)
        self.contents[cid] = files
        self.spool.drop_file(path, cid, "tester")

    def watcher(self) -> CidWatcher:
        return CidWatcher([self.root], lambda cid: expected_listing(self.contents[cid])
                          if cid in self.contents else None)

    def status(self, cid: str) -> str:
        state = self.spool.status(cid)
        if (self.root / "sw" / cid / ".publisher").exists():
            return "PRESENT"
        return state.state.value + (f":{state.reason}" if state.reason else "")


def test_repository_full_during_unpack_retries_then_publishes_once_room_is_made(


        tmp_path: Path) -> None:
    site = RepoOnTmpfs(tmp_path, "8m", max_attempts=6)
    with site.mounted(), site.watcher() as watcher:  # type: ignore[attr-defined]
        filler = site.root / "operators-other-data"
        filler.write_bytes(os.urandom(4 * MIB))  # 4 MiB left, for a 5 MiB CID
        site.drop("grp/fat", 5 * MIB)
        publisher = Daemon(site.path, "publisher", "--repo", REPO1,
                           log=tmp_path / "publisher.log")
        try:
            publisher.wait_log("No space left on device", 60)
            assert site.status("grp/fat") != "PRESENT"
            assert not (site.root / "sw" / "grp" / "fat").exists()
            filler.unlink()  # the operator makes room: 8 MiB for 5 MiB
            wait_for(lambda: site.status("grp/fat") == "PRESENT", 60, publisher.log)
        finally:
            publisher.stop()
        watcher.check()
    # (the tmpfs is gone; the CID was checked complete by the watcher while it was there)
    assert "grp/fat" in watcher.seen
    log = publisher.log()
    assert "transaction of 1 entries failed" in log and "published grp/fat" in log


def test_repository_full_fails_the_entry_with_the_reason_after_max_attempts(


        tmp_path: Path) -> None:
    site = RepoOnTmpfs(tmp_path, "4m", max_attempts=2)
    with site.mounted(), site.watcher() as watcher:  # type: ignore[attr-defined]
        site.drop("grp/huge", 6 * MIB)
        publisher = Daemon(site.path, "publisher", "--repo", REPO1,
                           log=tmp_path / "publisher.log")
        try:
            wait_for(lambda: site.status("grp/huge").startswith("failed:"), 60, publisher.log)
            site.drop("grp/fits", MIB // 2)  # the disk is usable again afterwards
            wait_for(lambda: site.status("grp/fits") == "PRESENT", 60, publisher.log)
        finally:
            publisher.stop()
        watcher.check()
        reason = site.status("grp/huge")
        assert "gave up after 2 attempts" in reason and "No space left on device" in reason
        assert not (site.root / "sw" / "grp" / "huge").exists()
        assert os.listdir(site.root / ".userpub" / "staging") == []
        assert listing(site.root / "sw" / "grp" / "fits") == \
            expected_listing(site.contents["grp/fits"])
