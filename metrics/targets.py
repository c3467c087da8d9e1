"""Prometheus scrape targets of this host, derived from the configuration."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from userpub.config import Config, split_address

WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 (compared, not bound)


@dataclass(frozen=True)
class Target:
    """One ``/metrics`` endpoint and the Prometheus job it belongs to."""

    job: str
    address: str
    repository: str = ""


def _reachable(host: str, port: int) -> str:
    if host in WILDCARDS:
        host = socket.getfqdn()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def scrape_targets(config: Config) -> list[Target]:
    """ingest (its plain-HTTP listener), one publisher per hosted repository, the janitor, and
    the replicator where this host keeps cvmfs-native replicas."""
    targets: list[Target] = []
    if config.ingest is not None and config.ingest.http_listen:
        targets.append(Target("userpub-ingest", _reachable(*split_address(config.ingest.http_listen))))
    host, port = split_address(config.metrics.publisher_listen)
    if port:
        targets.extend(Target("userpub-publisher", _reachable(host, port + i), repo.name)
                       for i, repo in enumerate(config.hosted))
    host, port = split_address(config.metrics.janitor_listen)
    if port and config.hosted:
        targets.append(Target("userpub-janitor", _reachable(host, port)))
    host, port = split_address(config.metrics.replicator_listen)
    if port and any(r.replica is not None and r.backend == "cvmfs-native"
                    and not r.is_hosted_on(config.server.name) for r in config.repositories):
        targets.append(Target("userpub-replicator", _reachable(host, port)))
    return targets


def file_sd_json(targets: list[Target]) -> str:
    """Prometheus file-based service discovery JSON (one group per target)."""
    groups = [{"targets": [t.address],
               "labels": {"job": t.job, **({"repository": t.repository} if t.repository else {})}}
              for t in targets]
    return json.dumps(groups, indent=2)
