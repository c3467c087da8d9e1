"""The cleanup rota: which hosted repository is due at a given moment (pure functions).

Repository *i* (1-based position among **all** configured repositories, hosted here or not)
owns the local hour ``(start_hour - 1 + i) % 24``. Only repositories hosted on this server are
ever due here.

**The rota day.** A day begins at ``start_hour:00`` local wall-clock time and ends at the next
``start_hour:00``; a moment belongs to the day of the calendar date of ``wall time -
start_hour``. So with ``start_hour = 22`` the third repository's slot (00:00) belongs to the
day that began at 22:00 the evening before, and every repository's slot falls inside its day.

A repository is *due* at ``now`` when its last successful run does not belong to the current
rota day and either

* its slot in the current day has begun (``slot``; ``missed`` once the slot hour is over: the
  janitor was down or busy, so it catches up as soon as it runs), or
* its last run belongs to a day before yesterday: yesterday's slot was missed entirely, so the
  run catches up at once instead of waiting for today's slot.

Since the run is recorded by its start time, it counts for the current day: a repository never
runs twice in one rota day, although a catch-up late in one day may be followed by the regular
run early in the next. A repository that never ran waits for its slot of the current day.

**Daylight saving time.** Slots are wall-clock times compared as wall-clock times. A slot that
does not exist (clocks jump from 02:00 to 03:00) is due at the first moment after it (03:00);
a wall hour that happens twice still runs once, because both occurrences belong to the same
rota day. ``tz=None`` means the system's local time zone.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

from userpub.config import Config

__all__ = ["Slot", "SlotState", "due_repositories", "plan", "rota_day", "seconds_until_next",
           "slot_start"]

HOUR = timedelta(hours=1)


class SlotState(enum.Enum):
    """Where a repository stands in the current rota day."""

    SLOT = "slot"  # its hour is now
    MISSED = "missed"  # its hour (today's or yesterday's) passed without a run: catch up
    WAITING = "waiting"  # its hour comes later today
    DONE = "done"  # it already ran today


@dataclass(frozen=True)
class Slot:
    """The rota's view of one hosted repository at one moment."""

    repository: str
    position: int  # 1-based among all configured repositories
    day: date  # the current rota day
    start: datetime  # naive local wall time of today's slot
    state: SlotState

    @property
    def due(self) -> bool:
        """True when the repository should be cleaned now."""
        return self.state in (SlotState.SLOT, SlotState.MISSED)


def wall(ts: float, tz: tzinfo | None = None) -> datetime:
    """The naive local wall-clock time of the instant ``ts``."""
    if tz is None:
        return datetime.fromtimestamp(ts)  # system local time, on purpose
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None)


def instant(when: datetime, tz: tzinfo | None = None) -> float:
    """The instant of the naive wall time ``when`` (a skipped wall time maps just after)."""
    if tz is None:
        return when.timestamp()
    return when.replace(tzinfo=tz).timestamp()


def rota_day(ts: float, start_hour: int, tz: tzinfo | None = None) -> date:
    """The rota day of the instant ``ts`` (days begin at ``start_hour:00`` local time)."""
    return (wall(ts, tz) - timedelta(hours=start_hour)).date()


def slot_start(day: date, position: int, start_hour: int) -> datetime:
    """Wall time at which the repository at ``position`` (1-based) starts on rota ``day``."""
    if position < 1:
        raise ValueError("positions start at 1")
    return datetime.combine(day, time(start_hour)) + ((position - 1) % 24) * HOUR


def plan(now: float, config: Config, last_success: Mapping[str, float],
         tz: tzinfo | None = None) -> list[Slot]:
    """The state of every hosted repository at ``now``, in configuration order.

    ``last_success`` maps repository names to the start time of their last successful run.
    """
    start_hour = config.janitor.start_hour
    today = rota_day(now, start_hour, tz)
    now_wall = wall(now, tz)
    slots: list[Slot] = []
    for position, repo in enumerate(config.repositories, start=1):
        if not repo.is_hosted_on(config.server.name):
            continue
        start = slot_start(today, position, start_hour)
        last = last_success.get(repo.name)
        last_day = rota_day(last, start_hour, tz) if last is not None else None
        if last_day is not None and last_day >= today:
            state = SlotState.DONE
        elif now_wall >= start + HOUR:
            state = SlotState.MISSED
        elif now_wall >= start:
            state = SlotState.SLOT
        elif last_day is not None and last_day < today - timedelta(days=1):
            state = SlotState.MISSED
        else:
            state = SlotState.WAITING
        slots.append(Slot(repo.name, position, today, start, state))
    return slots


def due_repositories(now: float, config: Config, last_success: Mapping[str, float],
                     tz: tzinfo | None = None) -> list[str]:
    """Names of the hosted repositories to clean at ``now``, in configuration order."""
    return [s.repository for s in plan(now, config, last_success, tz) if s.due]


def seconds_until_next(now: float, config: Config, last_success: Mapping[str, float],
                       tz: tzinfo | None = None, ignore: Collection[str] = ()) -> float:
    """Seconds from ``now`` until the next slot (or day) begins; 0 if a repository is due.

    Repositories in ``ignore`` (e.g. waiting to retry a failure) count as due tomorrow. A
    janitor with nothing due sleeps this long (callers cap it, so that a changed clock or time
    zone is noticed).
    """
    slots = plan(now, config, last_success, tz)
    if any(s.due and s.repository not in ignore for s in slots):
        return 0.0
    today = rota_day(now, config.janitor.start_hour, tz)
    tomorrow = today + timedelta(days=1)
    walls = [datetime.combine(tomorrow, time(config.janitor.start_hour))]
    for s in slots:
        walls.append(s.start if s.state is SlotState.WAITING
                     else slot_start(tomorrow, s.position, config.janitor.start_hour))
    return max(0.0, min(instant(w, tz) for w in walls) - now)
