"""The janitor's memory: one small JSON file per repository, ``<state>/janitor/<repo>.json``.

Each file records the last *successful* cleanup of its repository (when it started, which is
what the rota counts, and what it removed). Files are replaced atomically (write a sibling,
fsync, rename, fsync the directory), so a crash leaves the old record or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from userpub.fsutil import fsync_dir, unique_id

log = logging.getLogger("userpub.janitor")

__all__ = ["RunRecord", "StateStore"]


@dataclass(frozen=True)
class RunRecord:
    """The last successful cleanup of one repository."""

    repository: str
    started: float
    finished: float
    cids: int = 0
    stamps: int = 0
    bytes_freed: int = 0


class StateStore:
    """Reads and writes run records under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, repository: str) -> Path:
        """The record file of ``repository``."""
        return self.directory / f"{repository}.json"

    def load(self, repository: str) -> RunRecord | None:
        """The record of ``repository``, or None (missing or unreadable: logged)."""
        path = self.path(repository)
        try:
            data = json.loads(path.read_text())
            return RunRecord(repository=repository, started=float(data["started"]),
                             finished=float(data["finished"]), cids=int(data.get("cids", 0)),
                             stamps=int(data.get("stamps", 0)),
                             bytes_freed=int(data.get("bytes_freed", 0)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable janitor state %s: %s", path, err)
            return None

    def last_success(self, repositories: list[str]) -> dict[str, float]:
        """Start time of the last successful run of each of ``repositories`` that has one."""
        found = {}
        for name in repositories:
            record = self.load(name)
            if record is not None:
                found[name] = record.started
        return found

    def save(self, record: RunRecord) -> None:
        """Replace the record of ``record.repository`` atomically and durably."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(record.repository)
        tmp = self.directory / f".{record.repository}.{unique_id()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(asdict(record), sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(self.directory)
