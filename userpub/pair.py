"""The pair (any N): the other servers of the site, as the configuration names them.

Every server publishes its own repositories and keeps a replica of the others', so that any
of them answers for every CID. The same ``[[peer]]`` list may be used on every host: a server
skips the entry with its own name::

    [pair]
    timeout = 2.0                    # seconds a call to a peer may take
    cache_seconds = 5.0              # how long a peer's answer about a CID is reused
    replica_max_age_seconds = 600.0  # the janitor judges no ages on an older replica

    [[peer]]
    name = "pub2"
    url = "https://pub2.example.org:443"           # its HTTPS API
    stratum0 = "http://pub2.example.org:80/cvmfs"  # where its repositories are served
    dn = "/DC=org/DC=example/CN=pub2.example.org"  # its host certificate's subject

Peer calls go over mutual TLS with each server's host certificate; a call is trusted when the
caller's certificate subject is a configured peer's ``dn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from userpub.toml_section import Section, name_problem

__all__ = ["PairConfig", "PeerConfig", "parse_pair", "url_problem"]


@dataclass(frozen=True)
class PeerConfig:
    """One ``[[peer]]``: another server of the site."""

    name: str
    url: str  # https://host:port of its API
    stratum0: str = ""  # http://host:port/cvmfs: its repositories, served as a stratum 0
    dn: str = ""  # its host certificate's subject (slash form)


@dataclass(frozen=True)
class PairConfig:
    """``[pair]``: how this server deals with its peers."""

    timeout: float = 2.0
    cache_seconds: float = 5.0
    replica_max_age_seconds: float = 600.0


def url_problem(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """Why ``value`` is not a URL of one of ``schemes`` with a host, or None when it is."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in schemes or not rest.split("/")[0]:
        return f"{value!r} is not an {' or '.join(f'{s}://' for s in schemes)} URL"
    return None


def parse_pair(settings: Section, raw_peers: Any, base: Any, problems: list[str],
               this_server: str) -> tuple[PairConfig, tuple[PeerConfig, ...]]:
    """Read ``[pair]`` and ``[[peer]]`` (this server's own entry skipped)."""
    d = PairConfig()
    timeout = settings.number("timeout", d.timeout, minimum=0.1)
    cache = settings.number("cache_seconds", d.cache_seconds)
    max_age = settings.number("replica_max_age_seconds", d.replica_max_age_seconds,
                              minimum=10.0)
    settings.finish()
    if not isinstance(raw_peers, list):
        problems.append("[[peer]] must be an array of tables")
        raw_peers = []
    peers = []
    for i, raw in enumerate(raw_peers):
        sec = Section(raw, f"peer[{i + 1}]", base, problems)
        name = sec.required("name")
        if name and (problem := name_problem(name)):
            problems.append(f"{sec.where}.name: {problem}")
        url = sec.required("url").rstrip("/")
        if url and (problem := url_problem(url, ("https",))):
            problems.append(f"{sec.where}.url: {problem}")
        stratum0 = sec.string("stratum0", "").rstrip("/")
        if stratum0 and (problem := url_problem(stratum0, ("http", "https"))):
            problems.append(f"{sec.where}.stratum0: {problem}")
        dn = sec.string("dn", "")
        if dn and not dn.startswith("/"):
            problems.append(f"{sec.where}.dn: {dn!r} is not a subject in slash form (/DC=.../CN=...)")
        sec.finish()
        if name != this_server:
            peers.append(PeerConfig(name, url, stratum0, dn))
    names = [p.name for p in peers]
    problems.extend(f"peer {n!r} is configured twice" for n in sorted(set(names))
                    if names.count(n) > 1)
    return PairConfig(timeout, cache, max_age), tuple(peers)
