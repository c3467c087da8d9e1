"""Metric definitions, the spool-depth collector and the ``/metrics`` exporter."""

from metrics.definitions import (
    LATENCY_BUCKETS,
    IngestMetrics,
    JanitorMetrics,
    PublisherMetrics,
    ReplicaCollector,
    ReplicatorMetrics,
    SpoolCollector,
    daemon_registry,
    register_build_info,
)
from metrics.exporter import MetricsServer, serve_metrics, write_textfile

__all__ = ["LATENCY_BUCKETS", "IngestMetrics", "JanitorMetrics", "MetricsServer",
           "PublisherMetrics", "ReplicaCollector", "ReplicatorMetrics", "SpoolCollector",
           "daemon_registry", "register_build_info", "serve_metrics", "write_textfile"]
