"""What a replica remembers between pulls: ``<state>/replicas/<fqrn>.json``.

One small JSON file per replica, replaced atomically (write a sibling, rename), readable by any
process: the janitor judges the replica's freshness from it, the metrics report its age. It
holds the revision served and when the last pull succeeded, the last error, the revisions kept
for a grace period after they were replaced (so a reader walking one is not broken by garbage
collection), and when the replica was last collected.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from publisher.repositories.cvmfs_native.layout import write_atomic

MAX_RETAINED = 64


@dataclass(frozen=True)
class Retained:
    """A revision the replica served until ``replaced``; its objects are kept until ``until``."""

    revision: int
    root_catalog: str
    objects: tuple[str, ...]  # its certificate, history and meta-info, as ``<hex><suffix>``
    until: float


@dataclass
class ReplicaState:
    """The replica's record (times are Unix seconds; 0 = never)."""

    repository: str
    origin: str = ""
    revision: int = 0  # the revision this replica serves
    origin_revision: int = 0  # the origin's revision at the last successful pull
    root_catalog: str = ""
    last_success: float = 0.0
    last_change: float = 0.0
    last_attempt: float = 0.0
    last_error: str = ""
    retained: list[Retained] = field(default_factory=list)
    origin_last_gc: str = ""  # the origin's ``last_gc`` when this replica was last collected
    gc_last_run: float = 0.0
    gc_next_due: float = 0.0

    @classmethod
    def load(cls, path: Path, repository: str) -> ReplicaState:
        """The record at ``path``; a fresh one if it is missing or unreadable."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls(repository)
        if not isinstance(data, dict):
            return cls(repository)
        state = cls(repository)
        for name in ("origin", "root_catalog", "last_error", "origin_last_gc"):
            if isinstance(data.get(name), str):
                setattr(state, name, data[name])
        for name in ("revision", "origin_revision"):
            if isinstance(data.get(name), int):
                setattr(state, name, data[name])
        for name in ("last_success", "last_change", "last_attempt", "gc_last_run",
                     "gc_next_due"):
            if isinstance(data.get(name), int | float):
                setattr(state, name, float(data[name]))
        for item in data.get("retained", []) if isinstance(data.get("retained"), list) else []:
            try:
                state.retained.append(Retained(int(item["revision"]), str(item["root_catalog"]),
                                               tuple(str(o) for o in item["objects"]),
                                               float(item["until"])))
            except (KeyError, TypeError, ValueError):
                continue
        return state

    def save(self, path: Path) -> None:
        """Replace the record atomically (not fsynced: it is rebuilt by the next pull)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["retained"] = [asdict(r) | {"objects": list(r.objects)} for r in self.retained]
        write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(),
                     durable=False)

    def retain(self, previous: Retained, now: float) -> None:
        """Keep ``previous`` until its grace ends; forget revisions whose grace has ended, and
        all but the last ``MAX_RETAINED`` (older ones are still kept while the history tags
        them, as the origin keeps them)."""
        kept = [r for r in self.retained if r.until > now
                and r.root_catalog != previous.root_catalog] + [previous]
        self.retained = kept[-MAX_RETAINED:]

    def age(self, now: float) -> float | None:
        """Seconds since the last successful pull, or None if there was none."""
        return None if self.last_success <= 0 else max(0.0, now - self.last_success)


def state_file(directory: Path, repository: str) -> Path:
    """``<directory>/<fqrn>.json``."""
    return directory / f"{repository}.json"
