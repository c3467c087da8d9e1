"""Every metric of cvmfs-userpub, defined in one place, each set bound to an explicit registry.

Names follow Prometheus conventions: ``userpub_`` prefix, base units, ``_total`` counters,
low-cardinality labels (repository, result, route, status, reason) and never a CID or a DN.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from userpub import __version__

# Resolve the 300 s availability target: fine below a minute, then around 5 minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 240, 300, 360, 450, 600,
                   900, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


def daemon_registry() -> CollectorRegistry:
    """The registry of one daemon process: prometheus_client's standard collectors
    (``process_*`` from /proc, ``python_info``, ``python_gc_*``) on an explicit registry, to
    which the daemon's own metrics are added."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def register_build_info(registry: CollectorRegistry, component: str) -> None:
    """``userpub_build_info{version,python,component} 1``."""
    info = Gauge("userpub_build_info", "Version of cvmfs-userpub running in this process.",
                 ["version", "python", "component"], registry=registry)
    info.labels(__version__, platform.python_version(), component).set(1)


class IngestMetrics:
    """Metrics of the HTTPS publication API."""

    def __init__(self, registry: CollectorRegistry) -> None:
        register_build_info(registry, "ingest")
        self.requests = Counter("userpub_http_requests", "API requests by route and HTTP status.",
                                ["route", "status"], registry=registry)
        self.upload_bytes = Counter("userpub_upload_bytes", "Tarball bytes received and queued.",
                                    registry=registry)
        self.auth_failures = Counter("userpub_auth_failures",
                                     "Requests refused by authentication, by reason.",
                                     ["reason"], registry=registry)
        self.request_seconds = Histogram("userpub_http_request_duration_seconds",
                                         "Time to answer an API request.", ["route"],
                                         buckets=DURATION_BUCKETS, registry=registry)
        self.uploads_in_progress = Gauge("userpub_uploads_in_progress",
                                         "Uploads being received now.", registry=registry)


class PublisherMetrics:
    """Metrics of one publisher process (labelled by the repository it holds)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        register_build_info(registry, "publisher")
        self.latency = Histogram(
            "userpub_publish_latency_seconds",
            "From the moment an upload was durably queued to the moment its CID is visible.",
            ["repository"], buckets=LATENCY_BUCKETS, registry=registry)
        self.publishes = Counter("userpub_publishes",
                                 "Spool entries handled, by repository and result "
                                 "(published, present, stamped, failed, retried).",
                                 ["repository", "result"], registry=registry)
        self.failures = Counter("userpub_publish_failures", "Entries failed, by reason.",
                                ["repository", "reason"], registry=registry)
        self.files = Counter("userpub_published_files", "Files published.", ["repository"],
                             registry=registry)
        self.bytes = Counter("userpub_published_bytes", "Unpacked bytes published.",
                             ["repository"], registry=registry)
        self.batch_size = Histogram("userpub_publish_batch_size",
                                    "Entries published in one transaction.", ["repository"],
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.transaction_seconds = Histogram("userpub_transaction_duration_seconds",
                                             "Duration of one publish transaction.",
                                             ["repository"], buckets=DURATION_BUCKETS,
                                             registry=registry)
        self.stamps = Counter("userpub_stamps", "Access stamps written.", ["repository"],
                              registry=registry)
        self.lock_held = Gauge("userpub_publisher_lock_held",
                               "1 while this publisher holds its repository's lock.",
                               ["repository"], registry=registry)


class JanitorMetrics:
    """Metrics of the cleanup rota."""

    def __init__(self, registry: CollectorRegistry) -> None:
        register_build_info(registry, "janitor")
        self.runs = Counter("userpub_cleanup_runs", "Cleanup runs by repository and result.",
                            ["repository", "result"], registry=registry)
        self.removed_cids = Counter("userpub_cleanup_removed_cids", "CIDs removed as unused.",
                                    ["repository"], registry=registry)
        self.removed_stamps = Counter("userpub_cleanup_removed_stamps",
                                      "Stamps removed (expired or orphaned).", ["repository"],
                                      registry=registry)
        self.freed_bytes = Counter("userpub_cleanup_freed_bytes", "Bytes freed by cleanup.",
                                   ["repository"], registry=registry)
        self.duration = Gauge("userpub_cleanup_duration_seconds",
                              "Duration of the last cleanup run.", ["repository"],
                              registry=registry)
        self.skipped = Counter("userpub_cleanup_skipped", "Cleanups skipped, by repository "
                               "and reason (stale_replica: a replica too old to judge ages on).",
                               ["repository", "reason"], registry=registry)
        self.last_success = Gauge("userpub_cleanup_last_success_timestamp_seconds",
                                  "Unix time of the last successful cleanup.", ["repository"],
                                  registry=registry)


class ReplicatorMetrics:
    """Metrics of ``userpub replicator`` (revision and age: :class:`ReplicaCollector`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        register_build_info(registry, "replicator")
        self.pulls = Counter("userpub_replica_pulls",
                             "Pulls of a replica from its origin, by result (changed, unchanged, "
                             "failed).", ["repository", "result"], registry=registry)
        self.fetched_bytes = Counter("userpub_replica_fetched_bytes",
                                     "Bytes received from the origin (objects and letters).",
                                     ["repository"], registry=registry)
        self.fetched_objects = Counter("userpub_replica_fetched_objects",
                                       "Objects fetched from the origin (catalogs included).",
                                       ["repository"], registry=registry)
        self.pull_seconds = Histogram("userpub_replica_pull_duration_seconds",
                                      "Duration of one pull (also when nothing changed).",
                                      ["repository"], buckets=DURATION_BUCKETS,
                                      registry=registry)
        self.gc_removed = Counter("userpub_replica_gc_removed_objects",
                                  "Objects the replica's garbage collection deleted.",
                                  ["repository"], registry=registry)
        self.gc_freed = Counter("userpub_replica_gc_freed_bytes",
                                "Bytes the replica's garbage collection freed.", ["repository"],
                                registry=registry)


class ReplicaCollector(Collector):
    """Revision and age of every replica, read from their records at scrape time.

    ``read()`` returns ``{repository: (revision, unix time of the last successful pull)}`` for
    the replicas pulled at least once (the replica's record; metrics does not import it), so the
    age keeps growing when pulls fail or the replicator hangs.
    """

    def __init__(self, read: Callable[[], Mapping[str, tuple[int, float]]],
                 clock: Callable[[], float] = time.time) -> None:
        self.read = read
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield ``userpub_replica_revision`` and ``userpub_replica_age_seconds``."""
        now = self.clock()
        records = self.read()
        revision = GaugeMetricFamily("userpub_replica_revision",
                                     "Revision the replica serves.", labels=["repository"])
        age = GaugeMetricFamily("userpub_replica_age_seconds",
                                "Seconds since the replica's last successful pull.",
                                labels=["repository"])
        for name, (rev, last) in sorted(records.items()):
            revision.add_metric([name], rev)
            age.add_metric([name], max(0.0, now - last))
        yield revision
        yield age


class QueueDepth(Protocol):
    """What the spool reports (``spool.Depth``); metrics does not import the spool."""

    @property
    def incoming(self) -> int: ...
    @property
    def active(self) -> Mapping[str, int]: ...
    @property
    def failed(self) -> int: ...
    @property
    def oldest_incoming_age(self) -> float: ...


class SpoolCollector(Collector):
    """Queue depth computed from the spool directories at scrape time (it cannot drift).

    ``read_depth(now)`` is the spool's ``depth`` method; ``server`` names the host whose spool
    it is (every process of a host reports the same spool: aggregate with ``max by (server)``).
    """

    def __init__(self, read_depth: Callable[[float], QueueDepth], server: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.read_depth = read_depth
        self.server = server
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield queue depth by state and the age of the oldest waiting entry."""
        depth = self.read_depth(self.clock())
        entries = GaugeMetricFamily("userpub_queue_entries",
                                    "Spool entries by state (active: per repository).",
                                    labels=["server", "state", "repository"])
        entries.add_metric([self.server, "incoming", ""], depth.incoming)
        entries.add_metric([self.server, "failed", ""], depth.failed)
        for repo, count in sorted(depth.active.items()):
            entries.add_metric([self.server, "active", repo], count)
        yield entries
        oldest = GaugeMetricFamily("userpub_queue_oldest_entry_age_seconds",
                                   "Age of the oldest entry waiting in incoming/ (0 when empty).",
                                   labels=["server"])
        oldest.add_metric([self.server], depth.oldest_incoming_age)
        yield oldest
