"""Judging and cleaning against in-memory repository doubles (no disk trees, injected times)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest

from janitor.cleanup import DAY, CleanupError, Preview, clean, format_preview, judge
from publisher.repositories import GcResult, RemoveResult
from publisher.repositories.catalog import Catalog

REPO1, REPO2 = "repo1.example.org", "repo2.example.org"


class MemoryRepository:
    """A repository double; removals are applied at commit, as cvmfs_server does."""

    gc_needs_lock = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.unreadable_because: str | None = None
        self.stale: float | None = None  # None: an origin; seconds: a replica's age
        self.published: dict[str, float] = {}
        self.stamped: dict[str, float] = {}
        self.commits = 0
        self.aborts = 0
        self.gcs = 0

    # reader
    def contains(self, cid: str) -> bool:
        return cid in self.published

    def published_at(self, cid: str) -> float | None:
        return self.published.get(cid)

    def stamped_at(self, cid: str) -> float | None:
        return self.stamped.get(cid)

    def cids(self) -> Iterator[str]:
        yield from sorted(self.published)

    def stamps(self) -> Iterator[str]:
        yield from sorted(self.stamped)

    def visible_path(self, cid: str) -> str:
        return f"/cvmfs/{self.name}/sw/{cid}"

    def size_of(self, cid: str) -> int:
        return 10 if cid in self.published else 0

    def unreadable(self) -> str | None:
        return self.unreadable_because

    def staleness(self) -> float | None:
        return self.stale

    # writer
    @contextmanager
    def transaction(self) -> Iterator[_Txn]:
        txn = _Txn(self)
        try:
            yield txn
        except BaseException:
            self.aborts += 1
            raise
        for cid in txn.cids:
            self.published.pop(cid, None)
        for cid in txn.stamps:
            self.stamped.pop(cid, None)
        self.commits += 1

    def recover(self) -> None:
        pass

    def gc(self) -> GcResult:
        self.gcs += 1
        return GcResult(0, 0.0)

    def idle(self, seconds_idle: float) -> None:
        pass


class _Txn:
    def __init__(self, repo: MemoryRepository) -> None:
        self.repo = repo
        self.cids: list[str] = []
        self.stamps: list[str] = []

    def add(self, *args: object) -> None:
        raise NotImplementedError

    def stamp(self, cids: Iterable[str], who: str) -> None:
        raise NotImplementedError

    def remove(self, cids: Iterable[str], stamps: Iterable[str] = ()) -> RemoveResult:
        cids = [c for c in cids if self.repo.contains(c)]
        stamps = [c for c in stamps if c in self.repo.stamped]
        self.cids += cids
        self.stamps += stamps
        return RemoveResult(len(cids), len(stamps), 10 * len(cids))


@pytest.fixture
def repos():
    return MemoryRepository(REPO1), MemoryRepository(REPO2)


def test_judge_uses_the_newest_access_across_repositories(repos):
    a, b = repos
    now = 1_800_000_000.0
    a.published.update({"old": now - 40 * DAY, "stamped-b": now - 40 * DAY,
                        "young": now - 5 * DAY, "pub-b": now - 50 * DAY})
    b.stamped["stamped-b"] = now - 2 * DAY
    b.published["pub-b"] = now - DAY
    a.stamped.update({"orphan": now - 3 * DAY, "old": now - 35 * DAY, "in-b": now - 40 * DAY})
    b.published["in-b"] = now - 60 * DAY
    j = judge(a, Catalog([a, b]), as_of=now, max_days=30, not_after=now)
    assert [e.cid for e in j.expired] == ["old"]
    assert j.expired[0].last_access == now - 35 * DAY
    assert j.orphan_stamps == ("old", "orphan")  # "old" is orphaned once it goes
    assert j.scanned == 4
    lines = format_preview(Preview(j))
    assert lines[1].startswith("cid old last-access ") and "age 35.0d" in lines[1]


def test_nothing_used_at_or_after_the_scan_start_expires(repos):
    a, b = repos
    now = 1_800_000_000.0
    a.published.update({"before": now - 10.0, "at": now, "slack": now - 0.5})
    j = judge(a, Catalog([a, b]), as_of=now + 365 * DAY, max_days=30, not_after=now)
    assert [e.cid for e in j.expired] == ["before"]


def test_removals_applied_at_commit_abort_when_a_cid_is_used_meanwhile(config, repos):
    """After its re-check, a CID pending removal gets a stamp elsewhere: nothing is removed."""
    a, b = repos
    now = time.time()
    a.published.update({f"c{i}": now - 40 * DAY for i in range(3)})

    def meanwhile(done: int, total: int) -> None:
        if done == total:  # every removal is pending; c0 is used again before the commit
            b.stamped["c0"] = time.time()

    with pytest.raises(CleanupError, match="used while their removal was pending"):
        clean(config, REPO1, repository=a, catalog=Catalog([a, b]), progress=meanwhile)
    assert (a.commits, a.aborts, a.gcs) == (0, 1, 0)
    assert set(a.published) == {"c0", "c1", "c2"}
    # the next run starts over and keeps the CID used meanwhile
    result = clean(config, REPO1, repository=a, catalog=Catalog([a, b]))
    assert (result.cids, a.commits, a.gcs) == (2, 1, 1)
    assert set(a.published) == {"c0"}


def test_gc_of_other_backends_runs_under_the_lock(config, repos):
    a, b = repos
    a.published["old"] = time.time() - 40 * DAY
    result = clean(config, REPO1, repository=a, catalog=Catalog([a, b]))
    assert (result.cids, a.gcs) == (1, 1)
    assert result.lock_seconds <= result.duration


def test_a_stop_request_ends_the_removals_and_skips_gc(config, repos):
    a, b = repos
    a.published.update({f"c{i}": time.time() - 40 * DAY for i in range(5)})
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2  # after two removals

    result = clean(config, REPO1, repository=a, catalog=Catalog([a, b]), should_stop=stop)
    assert not result.completed
    assert result.cids == 2 and len(a.published) == 3
    assert a.gcs == 0


def test_an_unreadable_copy_stops_the_cleanup_before_any_removal(config, repos):
    a, b = repos
    a.published["old"] = time.time() - 40 * DAY
    b.unreadable_because = "/cvmfs2/repo2 is not a directory"
    with pytest.raises(CleanupError, match=r"repo2\.example\.org is unreadable: /cvmfs2/repo2"):
        clean(config, REPO1, repository=a, catalog=Catalog([a, b]))
    assert set(a.published) == {"old"} and a.commits == 0


@pytest.mark.parametrize("needs_lock", [True, False])
def test_gc_runs_under_the_lock_only_when_the_backend_needs_it(config, repos, needs_lock):
    from filelock import FileLock, Timeout

    from userpub.locks import transaction_lock_path

    a, b = repos
    a.gc_needs_lock = needs_lock
    a.published["old"] = time.time() - 40 * DAY
    held: list[bool] = []

    def gc() -> GcResult:
        try:
            with FileLock(transaction_lock_path(config, REPO1), timeout=0):
                held.append(False)
        except Timeout:
            held.append(True)
        return GcResult(0, 0.0)

    a.gc = gc  # type: ignore[method-assign]
    clean(config, REPO1, repository=a, catalog=Catalog([a, b]))
    assert held == [needs_lock]


@pytest.mark.parametrize(("age", "words"), [(601.0, "last refreshed 601 s ago"),
                                            (float("inf"), "never pulled")])
def test_a_stale_replica_stops_the_cleanup_before_any_removal(config, repos, age, words):
    from janitor.cleanup import StaleReplicaError

    a, b = repos
    a.published["old"] = time.time() - 40 * DAY
    b.stale = age
    with pytest.raises(StaleReplicaError, match=f"replica repo2.example.org is {words}"):
        clean(config, REPO1, repository=a, catalog=Catalog([a, b]))
    assert set(a.published) == {"old"} and a.commits == 0
    b.stale = 30.0  # fresh enough: the cleanup goes on
    assert clean(config, REPO1, repository=a, catalog=Catalog([a, b])).cids == 1
