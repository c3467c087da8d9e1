"""Typed reads from one TOML table, collecting problems instead of raising at once.

The building block of :mod:`userpub.config`: every ``[section]`` is read through a
:class:`Section`, which records each problem as one line (the CLI prints them as ``fatal:``)
and reports unknown keys when :meth:`Section.finish` is called.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Section", "address_problem", "name_problem", "split_address"]

T = TypeVar("T")


def split_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into its parts; ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (a server listens on all interfaces)


class Section:
    """Typed reads from one TOML table, collecting problems instead of raising at once."""

    def __init__(self, table: Any, where: str, base: Path, problems: list[str]) -> None:
        self.where = where
        self.base = base
        self.problems = problems
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            table = {}
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def _get(self, key: str, kind: type | tuple[type, ...], default: T, label: str) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.problems.append(f"{self.where}.{key}: expected {label}, got a boolean")
            return default
        if not isinstance(value, kind):
            self.problems.append(f"{self.where}.{key}: expected {label}, got {value!r}")
            return default
        return value  # type: ignore[return-value]

    def string(
        self, key: str, default: str, check: Callable[[str], str | None] | None = None
    ) -> str:
        value = self._get(key, str, default, "a string")
        if check is not None and key in self.table:
            problem = check(value)
            if problem:
                self.problems.append(f"{self.where}.{key}: {problem}")
        return value

    def required(self, key: str) -> str:
        if key not in self.table:
            self.problems.append(f"{self.where}.{key}: missing (required)")
            self.seen.add(key)
            return ""
        return self.string(key, "")

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key, int, default, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            self.problems.append(f"{self.where}.{key}: must be at least {minimum}{upper}")
            return default
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = float(self._get(key, (int, float), default, "a number"))
        if value < minimum:
            self.problems.append(f"{self.where}.{key}: must be at least {minimum}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, bool, default, "true or false")

    def path(self, key: str, default: Path | None) -> Path | None:
        if key not in self.table:
            self.seen.add(key)
            return default
        value = self.string(key, "")
        if not value:
            self.problems.append(f"{self.where}.{key}: must not be empty")
            return default
        return (self.base / Path(value).expanduser()).resolve() if value else default

    def address(self, key: str, default: str) -> str:
        return self.string(key, default, address_problem)

    def strings(self, key: str) -> tuple[str, ...]:
        value: list[Any] = self._get(key, list, [], "a list of strings")
        if not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{self.where}.{key}: expected a list of non-empty strings")
            return ()
        return tuple(value)

    def paths_by_name(self, key: str) -> tuple[tuple[str, Path], ...]:
        """A table of name -> path (paths relative to the configuration file)."""
        value: dict[str, Any] = self._get(key, dict, {}, "a table of name = \"path\"")
        if not all(isinstance(v, str) and v for v in value.values()):
            self.problems.append(f"{self.where}.{key}: every value must be a non-empty path")
            return ()
        return tuple((name, (self.base / Path(v).expanduser()).resolve())
                     for name, v in value.items())

    def lists_by_name(self, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """A table of name -> non-empty list of non-empty strings."""
        value: dict[str, Any] = self._get(key, dict, {}, 'a table of name = ["...", ...]')
        if not all(isinstance(v, list) and v and all(isinstance(s, str) and s for s in v)
                   for v in value.values()):
            self.problems.append(f"{self.where}.{key}: every value must be a non-empty list of "
                                 "non-empty strings")
            return ()
        return tuple((name, tuple(v)) for name, v in value.items())

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.seen):
            self.problems.append(f"{self.where}: unknown key {key!r}")


def address_problem(value: str) -> str | None:
    try:
        split_address(value)
    except ValueError as err:
        return str(err)
    return None


def name_problem(value: str) -> str | None:
    if not value or "/" in value or value.startswith(".") or any(c.isspace() for c in value):
        return f"{value!r} is not a usable name (no '/', whitespace or leading '.')"
    return None
