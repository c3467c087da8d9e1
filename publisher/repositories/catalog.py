"""Where is a CID, and when was it last used: the read-only view across every repository."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from publisher.repositories import RepositoryReader, open_reader
from userpub.config import Config


@dataclass(frozen=True)
class Location:
    """A published CID: the repository holding it and the path worker nodes use."""

    repository: str
    path: str


class Catalog:
    """Answers ``exists`` and last-access questions over all configured repositories."""

    def __init__(self, readers: Sequence[RepositoryReader]) -> None:
        self.readers = tuple(readers)

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        """A catalog over every repository of the configuration, in configuration order."""
        return cls([open_reader(config, r) for r in config.repositories])

    def only(self, names: Sequence[str]) -> Catalog:
        """The catalog of the repositories named (in this catalog's order)."""
        return Catalog([r for r in self.readers if r.name in names])

    def locate(self, cid: str) -> Location | None:
        """The first repository (in configuration order) where ``cid`` is published."""
        for reader in self.readers:
            if reader.contains(cid):
                return Location(reader.name, reader.visible_path(cid))
        return None

    def last_access(self, cid: str) -> float | None:
        """Newest of the publish time and every stamp of ``cid``, across all repositories."""
        times: list[float] = []
        for reader in self.readers:
            for t in (reader.published_at(cid), reader.stamped_at(cid)):
                if t is not None:
                    times.append(t)
        return max(times) if times else None
