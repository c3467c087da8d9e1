"""The janitor daemon driven with injected time and a double of the cleanup; its state files."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from janitor.cleanup import CleanupError, CleanupResult
from janitor.daemon import Janitor, JanitorError, parse_time, run_now, state_store
from janitor.state import RunRecord, StateStore
from metrics import JanitorMetrics
from tests.helpers import write_config
from userpub.config import load_config
from userpub.daemon import Waker

UTC = ZoneInfo("UTC")
REPO1, REPO2 = "repo1.example.org", "repo2.example.org"


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class FakeCleaner:
    """Stands in for :func:`janitor.cleanup.clean`: records calls, fails or stops on demand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.crash: set[str] = set()
        self.interrupt: set[str] = set()

    def __call__(self, config, name, *, clock, should_stop) -> CleanupResult:
        self.calls.append(name)
        if name in self.fail:
            raise CleanupError(f"{name} is unreadable")
        if name in self.crash:
            raise RuntimeError("disk on fire")
        return CleanupResult(name, clock(), 0.5, cids=3, stamps=2, bytes_freed=100,
                             completed=name not in self.interrupt)


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def janitor(config, registry):
    def make(clock: float, **kwargs) -> tuple[Janitor, FakeCleaner]:
        cleaner = FakeCleaner()
        daemon = Janitor(config, JanitorMetrics(registry), Waker(), tz=UTC,
                         clock=lambda: clock, clean_fn=cleaner, max_sleep=10 * 86400, **kwargs)
        return daemon, cleaner
    return make


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_runs_each_repository_in_its_hour_and_records_it(janitor, registry, config):
    daemon, cleaner = janitor(at("2026-06-10T03:10:00"))
    daemon.initialize()
    sleep = daemon.run_once(at("2026-06-10T03:10:00"))
    assert cleaner.calls == [REPO1]
    assert sleep == pytest.approx(50 * 60, abs=1)  # until repo2's slot at 04:00
    record = state_store(config).load(REPO1)
    assert record is not None
    assert record.started == pytest.approx(at("2026-06-10T03:10:00"), abs=1)
    assert (record.cids, record.stamps, record.bytes_freed) == (3, 2, 100)
    assert sample(registry, "userpub_cleanup_runs_total", repository=REPO1,
                  result="success") == 1
    assert sample(registry, "userpub_cleanup_removed_cids_total", repository=REPO1) == 3
    assert sample(registry, "userpub_cleanup_removed_stamps_total", repository=REPO1) == 2
    assert sample(registry, "userpub_cleanup_freed_bytes_total", repository=REPO1) == 100
    assert sample(registry, "userpub_cleanup_duration_seconds", repository=REPO1) == 0.5
    assert sample(registry, "userpub_cleanup_last_success_timestamp_seconds",
                  repository=REPO1) == at("2026-06-10T03:10:00")

    assert daemon.run_once(at("2026-06-10T03:40:00")) == pytest.approx(20 * 60, abs=1)
    assert cleaner.calls == [REPO1]
    daemon.run_once(at("2026-06-10T04:00:00"))
    assert cleaner.calls == [REPO1, REPO2]
    # both done: sleep until tomorrow 03:00
    assert daemon.run_once(at("2026-06-10T05:00:00")) == pytest.approx(22 * 3600, abs=1)
    assert cleaner.calls == [REPO1, REPO2]


def test_a_fresh_daemon_catches_up_missed_runs_from_its_state(janitor, config):
    store = state_store(config)
    for name in (REPO1, REPO2):
        store.save(RunRecord(name, at("2026-06-07T03:00:00"), at("2026-06-07T03:01:00")))
    daemon, cleaner = janitor(at("2026-06-10T01:00:00"))
    daemon.initialize()
    daemon.run_once(at("2026-06-10T01:00:00"))
    assert cleaner.calls == [REPO1, REPO2]
    daemon.run_once(at("2026-06-10T02:30:00"))
    assert cleaner.calls == [REPO1, REPO2]  # never twice in one rota day


def test_initialize_exports_the_last_success_from_the_state(janitor, registry, config):
    state_store(config).save(RunRecord(REPO2, 1000.0, 1234.0))
    daemon, _ = janitor(at("2026-06-10T01:00:00"))
    daemon.initialize()
    assert sample(registry, "userpub_cleanup_last_success_timestamp_seconds",
                  repository=REPO2) == 1234.0


def test_a_failed_cleanup_is_retried_later_and_not_recorded(janitor, registry, config):
    daemon, cleaner = janitor(at("2026-06-10T03:00:00"), retry_seconds=600)
    cleaner.fail.add(REPO1)
    daemon.initialize()
    sleep = daemon.run_once(at("2026-06-10T03:00:00"))
    assert sleep == pytest.approx(600, abs=1)
    assert state_store(config).load(REPO1) is None
    assert sample(registry, "userpub_cleanup_runs_total", repository=REPO1,
                  result="failed") == 1
    daemon.run_once(at("2026-06-10T03:05:00"))
    assert cleaner.calls == [REPO1]  # still backing off
    cleaner.fail.clear()
    daemon.run_once(at("2026-06-10T03:10:01"))
    assert cleaner.calls == [REPO1, REPO1]
    assert state_store(config).load(REPO1) is not None


def test_an_unexpected_error_is_logged_and_retried(janitor, caplog):
    daemon, cleaner = janitor(at("2026-06-10T04:30:00"), retry_seconds=60)
    cleaner.crash.add(REPO1)
    daemon.initialize()
    daemon.run_once(at("2026-06-10T04:30:00"))
    assert cleaner.calls == [REPO1, REPO2]  # one failure does not block the others
    assert "disk on fire" in caplog.text


def test_an_interrupted_cleanup_is_not_recorded(janitor, registry, config):
    daemon, cleaner = janitor(at("2026-06-10T03:00:00"))
    cleaner.interrupt.add(REPO1)
    daemon.initialize()
    daemon.run_once(at("2026-06-10T03:00:00"))
    assert state_store(config).load(REPO1) is None
    assert sample(registry, "userpub_cleanup_runs_total", repository=REPO1,
                  result="interrupted") == 1


def test_a_stop_request_ends_the_pass(janitor):
    daemon, cleaner = janitor(at("2026-06-10T05:00:00"))
    daemon.initialize()
    daemon.waker.stop()
    daemon.run_once(at("2026-06-10T05:00:00"))
    assert cleaner.calls == []


def test_no_hosted_repository_is_fatal(tmp_path, registry):
    config = load_config(write_config(tmp_path / "s", hosts={0: "x", 1: "y"}))
    daemon = Janitor(config, JanitorMetrics(registry), Waker())
    with pytest.raises(JanitorError, match="hosts no repository"):
        daemon.initialize()


# -- state files -------------------------------------------------------------------------------


def test_state_roundtrip_is_atomic_json(tmp_path):
    store = StateStore(tmp_path / "janitor")
    assert store.load("r") is None
    store.save(RunRecord("r", 10.0, 12.5, cids=1, stamps=2, bytes_freed=3))
    store.save(RunRecord("r", 20.0, 22.5, cids=4))
    assert store.load("r") == RunRecord("r", 20.0, 22.5, cids=4)
    assert json.loads((tmp_path / "janitor/r.json").read_text())["started"] == 20.0
    assert os.listdir(tmp_path / "janitor") == ["r.json"]  # no temporary file left
    assert store.last_success(["r", "other"]) == {"r": 20.0}


def test_unreadable_state_counts_as_never_ran(tmp_path, caplog):
    store = StateStore(tmp_path)
    (tmp_path / "r.json").write_text("{not json")
    assert store.load("r") is None
    assert "unreadable janitor state" in caplog.text


# -- command-line helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-06-10T03:00:00+00:00", at("2026-06-10T03:00:00")),
    ("2026-06-10T03:00:00Z", at("2026-06-10T03:00:00")),
    ("2026-06-10T05:00:00+02:00", at("2026-06-10T03:00:00")),
])
def test_parse_time(text, expected):
    assert parse_time(text) == expected


def test_parse_time_without_offset_is_local_time():
    assert parse_time("2026-06-10T03:00") == datetime(2026, 6, 10, 3).timestamp()


def test_parse_time_rejects_garbage():
    with pytest.raises(JanitorError, match="not an ISO 8601 time"):
        parse_time("next tuesday")


def test_real_cleanup_refuses_a_future_as_of(config, registry):
    with pytest.raises(JanitorError, match="future"):
        run_now(config, REPO1, time.time() + 7 * 86400, JanitorMetrics(registry), Waker())
