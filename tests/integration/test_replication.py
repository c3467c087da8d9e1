"""Two sites on loopback: pub1 publishes repo1 (cvmfs-native), pub2 keeps a stratum-1 replica of
it with ``userpub replicator``, serves it on its ingest's plain listener, and pub1 restores the
lost repository from it. Real processes, real HTTP, the genuine ``cvmfs_swissknife check``.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

from filelock import FileLock

from publisher.repositories.cvmfs_native import NativeReader
from publisher.repositories.replicas import replica_freshness
from tests.cvmfs_genuine import genuine_check
from tests.helpers import Daemon, make_tarball, run_userpub, wait_for, write_config
from tests.integration.test_metrics import promtool_check_metrics
from tests.pki import IngestProcess, TestPKI
from tests.unit.test_cvmfs_native_invariants import check_repository, userpub_verify
from userpub.config import Config, load_config
from userpub.fsutil import remove_tree
from userpub.locks import lock_path

REPO = "repo1.example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ingest_section(pki: TestPKI, http_port: int) -> str:
    values = {"listen": "127.0.0.1:0", "http_listen": f"127.0.0.1:{http_port}",
              "certificate": str(pki.host_cert), "key": str(pki.host_key),
              "ca_dir": str(pki.ca_dir), "grid_mapfile": str(pki.gridmap),
              "spool_reserve_bytes": 0}
    return "[ingest]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def publish(path: Path, tmp: Path, cid: str, files: dict[str, bytes]) -> None:
    tarball = make_tarball(tmp / f"{cid.replace('/', '_')}.tgz", files)
    run_userpub(path, "drop", str(tarball), "--cid", cid)
    run_userpub(path, "publisher", "--repo", REPO, "--once", timeout=300)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.MULTILINE)
    assert found, f"{name}{{{wanted}}} not in\n{text}"
    return float(found.group(1))


def replica_revision(config: Config) -> int:
    fresh = replica_freshness(config, REPO)
    return -1 if fresh is None else fresh[0]


def test_replicate_serve_and_restore(tmp_path):
    pki = TestPKI(tmp_path / "pki")
    a_http, b_http, b_metrics = free_port(), free_port(), free_port()
    a_path = write_config(tmp_path / "pub1", repos=1, server="pub1", backend="cvmfs-native",
                          extra=ingest_section(pki, a_http))
    a = load_config(a_path)
    run_userpub(a_path, "keys", "init", REPO)
    origin_key = a.server.state / "keys" / f"{REPO}.pub"
    b_path = write_config(
        tmp_path / "pub2", repos=1, server="pub2", hosts={0: "pub1"}, backend="cvmfs-native",
        extra=ingest_section(pki, b_http),
        repo_extra=(f'replica = "replicas/{REPO}"\n'
                    f'origin = "http://127.0.0.1:{a_http}/cvmfs/{REPO}"\n'
                    f'master_key = "{origin_key}"\n'))
    text = b_path.read_text().replace('state = "state"', 'state = "state"\nreplica_interval = 1.0')
    b_path.write_text(text.replace('replicator_listen = "127.0.0.1:0"',
                                   f'replicator_listen = "127.0.0.1:{b_metrics}"'))
    b = load_config(b_path)
    replica = tmp_path / "pub2" / "replicas" / REPO
    publish(a_path, tmp_path, "grp/one", {"bin/run": b"#!/bin/sh\necho one\n"})
    publish(a_path, tmp_path, "grp/two", {"data": bytes(range(256)) * 300})
    a_ingest = IngestProcess(a, tmp_path / "a-ingest.log")
    b_ingest = IngestProcess(b, tmp_path / "b-ingest.log")
    replicator = Daemon(b_path, "replicator", log=tmp_path / "replicator.log")
    try:
        origin = NativeReader(REPO, a.repositories[0].root, "sw", "ts", f"/cvmfs/{REPO}")
        revision = origin.manifest().revision
        wait_for(lambda: replica_revision(b) == revision, 60, replicator.log)
        assert f"empty -> revision {revision}" in replicator.log()
        status = run_userpub(b_path, "status", "grp/two")
        assert status.stdout == f"PRESENT:/cvmfs/{REPO}/sw/grp/two\n"  # read from the replica
        publish(a_path, tmp_path, "grp/three", {"x": b"three\n"})
        wait_for(lambda: replica_revision(b) == revision + 1, 60, replicator.log)
        assert f"revision {revision} -> revision {revision + 1}" in replicator.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{b_metrics}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        assert metric(scraped, "userpub_replica_revision", repository=REPO) == revision + 1
        assert metric(scraped, "userpub_replica_age_seconds", repository=REPO) < 600  # fresh
        assert metric(scraped, "userpub_replica_pulls_total", repository=REPO,
                      result="changed") == 2
        assert metric(scraped, "userpub_replica_fetched_bytes_total", repository=REPO) > 0
        promtool_check_metrics(scraped)
        # pub2's plain listener serves the replica as a stratum 1
        served = f"http://127.0.0.1:{b_http}/cvmfs/{REPO}"
        with urllib.request.urlopen(f"{served}/.cvmfspublished", timeout=10) as r:
            assert r.read() == (a.repositories[0].root / ".cvmfspublished").read_bytes()
        genuine_check(served, tmp_path / "check-served", fqrn=REPO, key=origin_key)

        # pub1 loses its repository; it is rebuilt from pub2's replica
        lost = a.repositories[0].root
        cids = sorted(origin.cids())
        stamps = {c: origin.stamped_at(c) for c in cids}
        remove_tree(lost)
        with FileLock(lock_path(a, REPO)):  # as a running publisher holds it
            refused = run_userpub(a_path, "restore", "--from", f"http://127.0.0.1:{b_http}/cvmfs",
                                  REPO, check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"fatal: the publisher of {REPO} is running")
        done = run_userpub(a_path, "restore", "--from", f"http://127.0.0.1:{b_http}/cvmfs", REPO)
        assert f"restored {REPO} at revision {revision + 1}" in done.stdout
        again = run_userpub(a_path, "restore", "--from", served, REPO, check=False)
        assert again.returncode == 1 and "still exists" in again.stderr
        assert again.stderr.count("\n") == 1
        restored = NativeReader(REPO, lost, "sw", "ts", f"/cvmfs/{REPO}")
        assert restored.manifest().revision == revision + 1
        assert sorted(restored.cids()) == cids
        assert {c: restored.stamped_at(c) for c in cids} == stamps
        assert (lost / ".cvmfspublished").is_symlink()  # the writer's own layout again
        check_repository(lost)
        userpub_verify(lost, origin_key, REPO)
        genuine_check(lost, tmp_path / "check-restored")
        # publishing resumes with the next revision, and the replica follows it
        publish(a_path, tmp_path, "grp/four", {"y": b"four\n"})
        assert restored.manifest().revision == revision + 2
        assert restored.contains("grp/four") and restored.contains("grp/one")
        wait_for(lambda: replica_revision(b) == revision + 2, 60, replicator.log)
        check_repository(replica)
        genuine_check(replica, tmp_path / "check-replica")
    finally:
        assert replicator.stop() == 0
        assert b_ingest.stop() == 0
        assert a_ingest.stop() == 0
    assert "Traceback" not in replicator.log()
