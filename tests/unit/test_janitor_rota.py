"""The rota as a pure function of time, configuration and the last successful runs."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from janitor.rota import (
    SlotState,
    due_repositories,
    plan,
    rota_day,
    seconds_until_next,
    slot_start,
)
from userpub.config import Config, JanitorConfig, RepositoryConfig, ServerConfig

UTC = ZoneInfo("UTC")
ZURICH = ZoneInfo("Europe/Zurich")  # DST: 2026-03-29 02:00 -> 03:00, 2026-10-25 03:00 -> 02:00


def make_config(start_hour: int = 3, repos: int = 4, not_hosted: tuple[int, ...] = ()) -> Config:
    """``repos`` repositories named r1..rN; positions in ``not_hosted`` live on another host."""
    repositories = tuple(
        RepositoryConfig(name=f"r{i}", host="other" if i in not_hosted else "me",
                         root=Path(f"/srv/r{i}"))
        for i in range(1, repos + 1))
    return Config(path=Path("/etc/userpub.toml"),
                  server=ServerConfig(name="me", spool=Path("/s"), state=Path("/st")),
                  repositories=repositories, janitor=JanitorConfig(start_hour=start_hour))


def at(text: str, tz: ZoneInfo = UTC) -> float:
    """A wall time in ``tz`` as a Unix time."""
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def states(now: float, config: Config, last: dict[str, float], tz: ZoneInfo = UTC
           ) -> dict[str, SlotState]:
    return {s.repository: s.state for s in plan(now, config, last, tz)}


def simulate(config: Config, start: float, end: float, step: float, tz: ZoneInfo,
             last: dict[str, float] | None = None) -> list[tuple[str, float]]:
    """Run the rota like the daemon does, every ``step`` seconds; return (repo, time) runs."""
    last = dict(last or {})
    runs = []
    t = start
    while t < end:
        for name in due_repositories(t, config, last, tz):
            runs.append((name, t))
            last[name] = t
        t += step
    return runs


# -- rota days and slots ---------------------------------------------------------------------


@pytest.mark.parametrize(("wall", "start_hour", "expected"), [
    ("2026-06-10T02:59:59", 3, date(2026, 6, 9)),
    ("2026-06-10T03:00:00", 3, date(2026, 6, 10)),
    ("2026-06-10T23:59:59", 3, date(2026, 6, 10)),
    ("2026-06-11T00:00:00", 3, date(2026, 6, 10)),  # midnight does not start a rota day
    ("2026-06-10T21:59:59", 22, date(2026, 6, 9)),
    ("2026-06-10T22:00:00", 22, date(2026, 6, 10)),
    ("2026-06-11T01:00:00", 22, date(2026, 6, 10)),
    ("2026-06-10T00:00:00", 0, date(2026, 6, 10)),
    ("2026-06-10T23:59:59", 0, date(2026, 6, 10)),
    ("2026-01-01T02:00:00", 3, date(2025, 12, 31)),  # across a year boundary
])
def test_rota_day_begins_at_start_hour(wall, start_hour, expected):
    assert rota_day(at(wall), start_hour, UTC) == expected


@pytest.mark.parametrize("start_hour", [0, 3, 12, 22, 23])
@pytest.mark.parametrize("position", [1, 2, 3, 10, 24, 25, 30])
def test_slot_hour_is_start_minus_one_plus_position_mod_24(start_hour, position):
    slot = slot_start(date(2026, 6, 10), position, start_hour)
    assert slot.hour == (start_hour - 1 + position) % 24
    assert slot.minute == 0
    day_start = datetime(2026, 6, 10, start_hour)
    assert day_start <= slot < day_start + timedelta(days=1)  # every slot inside its rota day


def test_slot_positions_start_at_one():
    with pytest.raises(ValueError, match="start at 1"):
        slot_start(date(2026, 6, 10), 0, 3)


# -- every hour of a day ---------------------------------------------------------------------


@pytest.mark.parametrize("start_hour", [0, 3, 21, 23])
def test_every_hour_of_a_day_exactly_one_repository_in_its_slot(start_hour):
    """All repositories ran yesterday in their slots; today each is due in its own hour only."""
    config = make_config(start_hour, repos=5, not_hosted=(3,))
    day = datetime(2026, 6, 10, start_hour)
    last = {f"r{i}": (day - timedelta(days=1) + timedelta(hours=i - 1, minutes=5))
            .replace(tzinfo=UTC).timestamp() for i in (1, 2, 4, 5)}
    hosted = (1, 2, 4, 5)
    for offset in range(24):
        position = offset + 1
        for minute in (0, 30, 59):
            now = (day + timedelta(hours=offset, minutes=minute)).replace(tzinfo=UTC).timestamp()
            expected = [f"r{position}"] if position in hosted else []
            assert due_repositories(now, config, last, UTC) == expected, (offset, minute)
            s = states(now, config, last)
            for i in hosted:
                state = (SlotState.DONE if i < position else
                         SlotState.SLOT if i == position else SlotState.WAITING)
                assert s[f"r{i}"] is state, (offset, minute, i)
        # the daemon runs what is due at the top of the hour: record it
        now = (day + timedelta(hours=offset)).replace(tzinfo=UTC).timestamp()
        for name in due_repositories(now, config, last, UTC):
            last[name] = now
    assert all(rota_day(t, start_hour, UTC) == day.date() for t in last.values())


@pytest.mark.parametrize("start_hour", [0, 3, 22, 23])
@pytest.mark.parametrize("step_minutes", [5, 13, 60])
def test_a_week_of_passes_runs_each_hosted_repository_once_a_day_in_its_hour(
        start_hour, step_minutes):
    config = make_config(start_hour, repos=26, not_hosted=(2, 7))
    start = at(f"2026-06-10T{start_hour:02d}:00:00")
    runs = simulate(config, start, start + 7 * 86400, step_minutes * 60, UTC)
    per_repo: dict[str, list[float]] = defaultdict(list)
    for name, t in runs:
        per_repo[name].append(t)
    assert set(per_repo) == {f"r{i}" for i in range(1, 27)} - {"r2", "r7"}
    for name, times in per_repo.items():
        position = int(name[1:])
        assert len(times) == 7, name
        assert len({rota_day(t, start_hour, UTC) for t in times}) == 7, name  # once per day
        for t in times:
            run_at = datetime.fromtimestamp(t, UTC)
            assert run_at.hour == (start_hour - 1 + position) % 24, (name, run_at)
            assert run_at.minute < step_minutes


def test_repository_25_shares_the_hour_of_repository_1():
    config = make_config(3, repos=25)
    now = at("2026-06-10T03:10:00")
    last = {f"r{i}": at("2026-06-09T12:00:00") for i in range(1, 26)}
    assert due_repositories(now, config, last, UTC) == ["r1", "r25"]


def test_repositories_hosted_elsewhere_are_never_due_but_keep_positions():
    config = make_config(3, repos=3, not_hosted=(1,))
    assert [s.repository for s in plan(at("2026-06-10T12:00:00"), config, {}, UTC)] == ["r2",
                                                                                       "r3"]
    assert due_repositories(at("2026-06-10T03:30:00"), config, {}, UTC) == []
    assert due_repositories(at("2026-06-10T04:30:00"), config, {}, UTC) == ["r2"]


# -- the day boundary --------------------------------------------------------------------------


def test_day_boundary_around_midnight_with_a_late_start_hour():
    """start_hour 22: slots 22:00, 23:00, 00:00, 01:00 all belong to the day begun at 22:00."""
    config = make_config(22, repos=4)
    last = {"r1": at("2026-06-10T22:05:00"), "r2": at("2026-06-10T23:01:00")}
    # just after midnight: r3's slot; r1 and r2 already ran this rota day (yesterday's date)
    s = states(at("2026-06-11T00:20:00"), config, last)
    assert s == {"r1": SlotState.DONE, "r2": SlotState.DONE, "r3": SlotState.SLOT,
                 "r4": SlotState.WAITING}
    last["r3"] = at("2026-06-11T00:20:00")
    last["r4"] = at("2026-06-11T01:00:00")
    # the rest of the calendar day belongs to the same rota day: nothing is due again...
    for hour in range(1, 22):
        assert due_repositories(at(f"2026-06-11T{hour:02d}:30:00"), config, last, UTC) == []
    # ...until 22:00 begins the next rota day
    assert due_repositories(at("2026-06-11T22:00:00"), config, last, UTC) == ["r1"]


def test_day_boundary_at_start_hour_never_twice_the_same_day():
    config = make_config(3, repos=2)
    last = {"r1": at("2026-06-10T03:00:00"), "r2": at("2026-06-10T04:00:00")}
    for minute in range(0, 23 * 60, 10):
        now = at("2026-06-10T04:01:00") + minute * 60
        assert due_repositories(now, config, last, UTC) == [], minute
    assert due_repositories(at("2026-06-11T02:59:59"), config, last, UTC) == []
    assert due_repositories(at("2026-06-11T03:00:00"), config, last, UTC) == ["r1"]


def test_a_run_late_in_its_day_still_counts_for_that_day():
    """A cleanup recorded by its start time at 02:59 counts for the day that began yesterday."""
    config = make_config(3, repos=1)
    last = {"r1": at("2026-06-11T02:59:00")}
    assert states(at("2026-06-11T02:59:30"), config, last)["r1"] is SlotState.DONE
    assert due_repositories(at("2026-06-11T03:00:00"), config, last, UTC) == ["r1"]


# -- missed runs -----------------------------------------------------------------------------


def test_missed_slot_earlier_today_catches_up_at_once_and_only_once():
    config = make_config(3, repos=3)
    last = {name: at("2026-06-09T05:30:00") for name in ("r1", "r2", "r3")}
    now = at("2026-06-10T14:00:00")  # the host was down from 02:00 to 14:00
    assert states(now, config, last) == {n: SlotState.MISSED for n in ("r1", "r2", "r3")}
    assert due_repositories(now, config, last, UTC) == ["r1", "r2", "r3"]
    last = dict.fromkeys(last, now)
    assert due_repositories(at("2026-06-11T02:59:00"), config, last, UTC) == []
    assert due_repositories(at("2026-06-11T03:00:00"), config, last, UTC) == ["r1"]


def test_a_whole_missed_day_catches_up_before_todays_slot():
    """Down all of yesterday; started today before r2's slot: r2 runs now, not again at 04:00."""
    config = make_config(3, repos=2)
    last = {"r1": at("2026-06-08T03:00:00"), "r2": at("2026-06-08T04:00:00")}
    now = at("2026-06-10T03:30:00")
    assert states(now, config, last) == {"r1": SlotState.SLOT, "r2": SlotState.MISSED}
    last = {"r1": now, "r2": now}
    assert due_repositories(at("2026-06-10T04:00:00"), config, last, UTC) == []
    assert due_repositories(at("2026-06-11T04:00:00"), config, last, UTC) == ["r1", "r2"]


def test_startup_just_before_start_hour_catches_up_yesterday_then_runs_today():
    """Documented: a catch-up at 02:30 belongs to yesterday's rota day; 03:00 starts a new one."""
    config = make_config(3, repos=1)
    last = {"r1": at("2026-06-08T03:00:00")}
    now = at("2026-06-10T02:30:00")
    assert due_repositories(now, config, last, UTC) == ["r1"]
    last["r1"] = now
    assert due_repositories(at("2026-06-10T02:59:59"), config, last, UTC) == []
    assert due_repositories(at("2026-06-10T03:00:00"), config, last, UTC) == ["r1"]


def test_a_repository_that_never_ran_waits_for_its_slot():
    config = make_config(3, repos=2)
    assert states(at("2026-06-10T03:30:00"), config, {}) == {"r1": SlotState.SLOT,
                                                           "r2": SlotState.WAITING}
    assert due_repositories(at("2026-06-10T04:00:00"), config, {}, UTC) == ["r1", "r2"]
    # 02:00 belongs to the rota day begun yesterday at 03:00, whose slots have passed
    assert due_repositories(at("2026-06-10T02:00:00"), config, {}, UTC) == ["r1", "r2"]


def test_a_record_from_the_future_counts_as_done():
    """A clock set back must not make the janitor run every pass."""
    config = make_config(3, repos=1)
    assert due_repositories(at("2026-06-10T12:00:00"), config,
                            {"r1": at("2026-06-12T04:00:00")}, UTC) == []


# -- when to wake up ---------------------------------------------------------------------------


def test_seconds_until_next_slot():
    config = make_config(3, repos=3)
    last = {"r1": at("2026-06-10T03:00:00")}
    assert seconds_until_next(at("2026-06-10T03:30:00"), config, last, UTC) == 1800
    last["r2"] = at("2026-06-10T04:00:00")
    last["r3"] = at("2026-06-10T05:00:00")
    # all done today: the next event is tomorrow's rota day start, 03:00
    assert seconds_until_next(at("2026-06-10T05:30:00"), config, last, UTC) == 21.5 * 3600
    assert seconds_until_next(at("2026-06-10T12:00:00"), config, {}, UTC) == 0


def test_seconds_until_next_ignores_repositories_waiting_for_a_retry():
    config = make_config(3, repos=2)
    last = {"r2": at("2026-06-10T04:00:00")}
    now = at("2026-06-10T05:00:00")
    assert seconds_until_next(now, config, last, UTC) == 0  # r1 is due
    assert seconds_until_next(now, config, last, UTC, ignore={"r1"}) == 22 * 3600


# -- daylight saving time ----------------------------------------------------------------------


def test_spring_forward_skipped_slot_runs_at_the_first_moment_after_it():
    """Zurich 2026-03-29: 02:00 CET jumps to 03:00 CEST. start_hour 2: r1's slot never exists."""
    config = make_config(2, repos=2)
    last = {"r1": at("2026-03-28T02:00:00", ZURICH), "r2": at("2026-03-28T03:00:00", ZURICH)}
    before = at("2026-03-29T01:59:59", ZURICH)
    assert due_repositories(before, config, last, ZURICH) == []
    after = before + 1  # 03:00:00 CEST
    assert datetime.fromtimestamp(after, ZURICH).hour == 3
    assert due_repositories(after, config, last, ZURICH) == ["r1", "r2"]
    # one hour of real time from 01:00 CET to the 03:00 slot of start_hour 3
    config3 = make_config(3, repos=1)
    last3 = {"r1": at("2026-03-28T03:00:00", ZURICH)}
    assert seconds_until_next(at("2026-03-29T01:00:00", ZURICH), config3, last3, ZURICH) == 3600


def test_fall_back_repeated_hour_runs_once():
    """Zurich 2026-10-25: 03:00 CEST falls back to 02:00 CET; the 02:00 slot exists twice."""
    config = make_config(2, repos=2)
    start = at("2026-10-24T12:00:00", ZURICH)
    last = {"r1": at("2026-10-24T02:00:00", ZURICH), "r2": at("2026-10-24T03:00:00", ZURICH)}
    runs = simulate(config, start, start + 3 * 86400, 300, ZURICH, last)
    per_repo: dict[str, list[float]] = defaultdict(list)
    for name, t in runs:
        per_repo[name].append(t)
    for name, times in per_repo.items():
        days = [rota_day(t, 2, ZURICH) for t in times]
        assert len(days) == len(set(days)) == 3, (name, days)
    r1 = [datetime.fromtimestamp(t, ZURICH) for t in per_repo["r1"]]
    assert [t.hour for t in r1] == [2, 2, 2]
    # on the 25th it ran in the first 02:00 (CEST, +02:00), not again in the second one
    assert r1[0].day == 25
    assert r1[0].utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize("start", ["2026-03-27T12:00:00", "2026-10-23T12:00:00"])
@pytest.mark.parametrize("start_hour", [1, 2, 3])
def test_dst_weeks_each_repository_once_per_rota_day(start, start_hour):
    config = make_config(start_hour, repos=4)
    begin = at(start, ZURICH)
    last = dict.fromkeys(("r1", "r2", "r3", "r4"), begin - 3600)  # ran this rota day already
    runs = simulate(config, begin, begin + 5 * 86400, 600, ZURICH, last)
    per_repo: dict[str, list[date]] = defaultdict(list)
    for name, t in runs:
        per_repo[name].append(rota_day(t, start_hour, ZURICH))
    for name, days in per_repo.items():
        assert len(days) == len(set(days)), (name, days)
        assert len(days) == 5, (name, days)
