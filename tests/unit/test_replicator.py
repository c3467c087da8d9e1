"""The replicator daemon in-process, and what the configuration says about this host's replicas."""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ingest.stratum0 import stratum0_repositories
from metrics import ReplicaCollector, ReplicatorMetrics
from metrics.targets import scrape_targets
from publisher.replicator import Replicator, ReplicatorError, freshness_records
from publisher.repositories import TreeReader, open_reader
from publisher.repositories.cvmfs_native import NativeReader, NativeRepository, init_keys
from publisher.repositories.replicas import (
    replica_freshness,
    replica_master_key,
    replica_origin,
    replica_targets,
    replicas_here,
)
from publisher.tarball import UnpackLimits
from tests.helpers import make_tarball, run_userpub, write_config
from tests.unit.test_cvmfs_native_stratum0 import serve_stratum0
from userpub.config import Config, MetricsConfig, load_config
from userpub.daemon import Waker
from userpub.supervisor import plan_children

REPO = "repo1.example.org"


def replica_site(tmp: Path, origin: str | None, *, backend: str = "cvmfs-native") -> Config:
    """pub2's configuration: repo1 published by pub1, with a replica here; repo2 hosted here."""
    extra_repo = f'replica = "replicas/{REPO}"\nmaster_key = "origin-keys/{REPO}.pub"\n'
    if origin is not None:
        extra_repo += f'origin = "{origin}"\n'
    path = write_config(tmp / "pub2", repos=1, server="pub2", hosts={0: "pub1"},
                        backend=backend, repo_extra=extra_repo,
                        extra="")
    text = path.read_text().replace('state = "state"', 'state = "state"\nreplica_interval = 1.0')
    path.write_text(text)
    return load_config(path)


@pytest.fixture
def origin(tmp_path):
    keys = init_keys(tmp_path / "pub2" / "origin-keys", REPO)
    repo = NativeRepository(REPO, tmp_path / "pub1" / REPO, "sw", "ts", f"/cvmfs/{REPO}",
                            keys=keys, durable=False)
    repo.recover()
    with repo.transaction() as txn:
        txn.add("grp/one", make_tarball(tmp_path / "one.tgz", {"f": random.randbytes(1000)}),
                "alice", UnpackLimits())
    with serve_stratum0({REPO: repo.root}) as base:
        yield repo, f"{base}/cvmfs/{REPO}"


def test_what_the_configuration_says_about_replicas(tmp_path):
    config = replica_site(tmp_path, "http://pub1.example.org:8000/cvmfs/repo1.example.org/")
    (repo,) = replicas_here(config)
    (target,) = replica_targets(config)
    assert target.origin.url == "http://pub1.example.org:8000/cvmfs/repo1.example.org"
    assert target.root == tmp_path / "pub2" / "replicas" / REPO
    assert target.origin.master_key == tmp_path / "pub2" / "origin-keys" / f"{REPO}.pub"
    assert target.state == config.server.state / "replicas" / f"{REPO}.json"
    reader = open_reader(config, repo)
    assert isinstance(reader, NativeReader)  # read in place, no FUSE
    assert "is not a directory" in reader.unreadable()
    target.root.mkdir(parents=True)
    assert "has not been pulled yet" in reader.unreadable()  # the janitor judges nothing then
    assert stratum0_repositories(config) == {REPO: target.root}  # served as a stratum 1
    assert [c.name for c in plan_children(config, sys.executable)][-1] == "replicator"
    assert "userpub-replicator" not in [t.job for t in scrape_targets(config)]  # port 0
    listening = dataclasses.replace(config, metrics=MetricsConfig())
    assert "userpub-replicator" in [t.job for t in scrape_targets(listening)]
    assert replica_freshness(config, repo) is None  # never pulled
    default = load_config(write_config(tmp_path / "d", repos=1, server="pub2",
                                       hosts={0: "pub1"}, backend="cvmfs-native",
                                       repo_extra='replica = "r"'))
    (plain,) = replicas_here(default)
    assert replica_master_key(default, plain) == default.server.state / "keys" / f"{REPO}.pub"
    assert replica_targets(default) == []  # no origin: read, never pulled
    assert "replicator" not in [c.name for c in plan_children(default, sys.executable)]
    local = replica_site(tmp_path / "local", None, backend="local")
    assert replicas_here(local) == () and isinstance(open_reader(local, local.repositories[0]),
                                                     TreeReader)


def test_the_daemon_pulls_reports_and_recovers(origin, tmp_path, caplog):
    repo, url = origin
    config = replica_site(tmp_path, url)
    registry = CollectorRegistry()
    metrics = ReplicatorMetrics(registry)
    registry.register(ReplicaCollector(lambda: freshness_records(config)))
    waker = Waker()
    daemon = Replicator(config, metrics, waker)
    caplog.set_level(logging.INFO, "userpub.replicator")
    daemon.initialize()
    assert daemon.run_once(0.0) <= 1.0
    revision = repo.manifest().revision
    fresh = replica_freshness(config, REPO)
    assert fresh is not None and fresh[0] == revision and fresh[1] < 600
    assert f"empty -> revision {revision}" in caplog.text
    reader = open_reader(config, config.repositories[0])
    assert reader.contains("grp/one") and reader.visible_path("grp/one").startswith("/cvmfs/")
    assert reader.unreadable() is None
    caplog.clear()
    daemon.run_once(0.0)
    assert "->" not in caplog.text  # nothing changed: nothing logged
    text = generate_latest(registry).decode()
    assert f'userpub_replica_revision{{repository="{REPO}"}} {revision}.0' in text
    assert 'userpub_replica_pulls_total{repository="repo1.example.org",result="changed"} 1.0' \
        in text
    assert 'result="unchanged"} 1.0' in text and "userpub_replica_age_seconds{" in text
    assert "userpub_replica_fetched_bytes_total" in text
    # the origin goes away: one error line, not one per pass; the record keeps the last success
    bad = replica_site(tmp_path / "down", "http://127.0.0.1:9/cvmfs/repo1.example.org")
    (tmp_path / "down" / "pub2" / "origin-keys").mkdir(parents=True)
    shutil.copy(repo.key_files.master_public, tmp_path / "down" / "pub2" / "origin-keys")
    down = Replicator(bad, ReplicatorMetrics(CollectorRegistry()), waker)
    down.initialize()
    caplog.clear()
    down.run_once(0.0)
    down.run_once(0.0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "connection refused" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage() and down.failed == {REPO}
    assert replica_freshness(bad, REPO) is None
    target = down.targets[0]
    down.targets = [dataclasses.replace(target, origin=dataclasses.replace(target.origin,
                                                                            url=url))]
    caplog.clear()
    down.run_once(0.0)
    assert "pulls from" in caplog.text and "succeed again" in caplog.text and not down.failed
    assert replica_freshness(bad, REPO)[0] == revision


def test_the_command_pulls_once_and_exits_with_its_outcome(origin, tmp_path):
    _, url = origin
    good = replica_site(tmp_path, url)
    done = run_userpub(good.path, "replicator", "--once")
    assert "-> revision" in done.stderr and replica_freshness(good, REPO) is not None
    bad = replica_site(tmp_path / "down", "http://127.0.0.1:9/cvmfs/repo1.example.org")
    failed = run_userpub(bad.path, "replicator", "--once", check=False)
    errors = [line for line in failed.stderr.splitlines() if " ERROR " in line]
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr
    nothing = run_userpub(write_config(tmp_path / "none", repos=1), "replicator", check=False)
    assert nothing.returncode == 1
    assert nothing.stderr.strip().splitlines()[-1].startswith("fatal: this server (pub1) keeps "
                                                              "no replica with an origin")


def test_nothing_to_replicate_is_one_clear_error(tmp_path):
    config = load_config(write_config(tmp_path, repos=1, backend="cvmfs-native"))
    with pytest.raises(ReplicatorError, match="keeps no replica with an origin"):
        Replicator(config, ReplicatorMetrics(CollectorRegistry()), Waker()).initialize()
    site = replica_site(tmp_path / "x", "http://127.0.0.1:9/cvmfs/repo1.example.org")
    with pytest.raises(ReplicatorError, match=r"other\.org is not a replica with an origin"):
        Replicator(site, ReplicatorMetrics(CollectorRegistry()), Waker(),
                   only="other.org").initialize()


def test_a_replica_is_pulled_from_its_peers_stratum0_unless_an_origin_is_set(tmp_path):
    from tests.pair import PairSites

    sites = PairSites(tmp_path)
    b = sites["pubB"].config
    assert b is not None
    repo1 = b.repository(REPO)
    assert replica_origin(b, repo1) == f"{sites['pubA'].stratum0}/{REPO}"
    assert [t.name for t in replica_targets(b)] == [REPO, "repo2.example.org"]
    moved = dataclasses.replace(repo1, origin="http://mirror.example.org/cvmfs/" + REPO)
    assert replica_origin(b, moved) == "http://mirror.example.org/cvmfs/" + REPO
    lost = dataclasses.replace(repo1, host="pubC")  # no such peer, no origin: only read
    assert replica_origin(b, lost) is None
    # staleness: infinite before the first pull (the janitor waits), None for own repositories
    assert open_reader(b, repo1).staleness() == float("inf")
    assert open_reader(b, b.repository("repo3.example.org")).staleness() is None
