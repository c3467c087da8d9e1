"""The Grafana dashboard, built from code so that every query is listed (and tested) in one place.

``python -m metrics.dashboard > metrics/dashboards/userpub.json`` regenerates the JSON file that
operators import; a test checks the committed file matches and evaluates every query against a
real Prometheus.
"""

from __future__ import annotations

import json
import sys
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
REPO = 'repository=~"$repository"'

# (title, unit, panel type, [(legend, expr), ...])
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("Publish latency (queued -> visible)", "s", "timeseries", [
        (f"p{q}", f"histogram_quantile(0.{q}, sum by (le) "
                  f"(rate(userpub_publish_latency_seconds_bucket{{{REPO}}}[$__rate_interval])))")
        for q in ("50", "95", "99")
    ]),
    ("Visible within 5 minutes (target 99%)", "percentunit", "stat", [
        ("last hour", f'sum(rate(userpub_publish_latency_seconds_bucket{{{REPO},le=~"300|300.0"}}[1h]))'
                      f" / sum(rate(userpub_publish_latency_seconds_count{{{REPO}}}[1h]))"),
        ("last day", f'sum(rate(userpub_publish_latency_seconds_bucket{{{REPO},le=~"300|300.0"}}[1d]))'
                     f" / sum(rate(userpub_publish_latency_seconds_count{{{REPO}}}[1d]))"),
    ]),
    ("Fraction within 5 minutes by repository", "percentunit", "timeseries", [
        ("{{repository}}", f"repository:userpub_publish_within_300s:ratio_rate1h{{{REPO}}}"),
        ("target", "vector(0.99)"),
    ]),
    ("Queue depth", "short", "timeseries", [
        ("{{state}} {{repository}}", "sum by (state, repository) "
                                     "(max by (server, state, repository) (userpub_queue_entries))"),
    ]),
    ("Oldest waiting entry", "s", "timeseries", [
        ("{{server}}", "max by (server) (userpub_queue_oldest_entry_age_seconds)"),
    ]),
    ("Publishes per minute", "short", "timeseries", [
        ("{{repository}} {{result}}", f"sum by (repository, result) "
                                      f"(rate(userpub_publishes_total{{{REPO}}}[$__rate_interval])) * 60"),
    ]),
    ("Published bytes per second", "Bps", "timeseries", [
        ("{{repository}}", f"sum by (repository) "
                           f"(rate(userpub_published_bytes_total{{{REPO}}}[$__rate_interval]))"),
    ]),
    ("Batch size (mean)", "short", "timeseries", [
        ("{{repository}}", f"sum by (repository) (rate(userpub_publish_batch_size_sum{{{REPO}}}"
                           f"[$__rate_interval])) / sum by (repository) "
                           f"(rate(userpub_publish_batch_size_count{{{REPO}}}[$__rate_interval]))"),
    ]),
    ("Failures by reason (last hour)", "short", "timeseries", [
        ("{{repository}} {{reason}}", f"sum by (repository, reason) "
                                      f"(increase(userpub_publish_failures_total{{{REPO}}}[1h]))"),
    ]),
    ("Uploads by status", "reqps", "timeseries", [
        ("{{status}}", 'sum by (status) (rate(userpub_http_requests_total{route="publish"}'
                       '[$__rate_interval]))'),
    ]),
    ("API requests by route", "reqps", "timeseries", [
        ("{{route}} {{status}}", "sum by (route, status) "
                                 "(rate(userpub_http_requests_total[$__rate_interval]))"),
    ]),
    ("Authentication failures by reason", "short", "timeseries", [
        ("{{reason}}", "sum by (reason) (increase(userpub_auth_failures_total[1h]))"),
    ]),
    ("Upload bytes per second", "Bps", "timeseries", [
        ("received", "sum(rate(userpub_upload_bytes_total[$__rate_interval]))"),
    ]),
    ("Cleanup: CIDs and stamps removed per day", "short", "timeseries", [
        ("{{repository}} CIDs", f"sum by (repository) "
                                f"(increase(userpub_cleanup_removed_cids_total{{{REPO}}}[1d]))"),
        ("{{repository}} stamps", f"sum by (repository) "
                                  f"(increase(userpub_cleanup_removed_stamps_total{{{REPO}}}[1d]))"),
    ]),
    ("Cleanup: bytes freed per day", "bytes", "timeseries", [
        ("{{repository}}", f"sum by (repository) "
                           f"(increase(userpub_cleanup_freed_bytes_total{{{REPO}}}[1d]))"),
    ]),
    ("Cleanup: time since last success", "s", "stat", [
        ("{{repository}}", f"time() - max by (repository) "
                           f"(userpub_cleanup_last_success_timestamp_seconds{{{REPO}}})"),
    ]),
    ("Cleanup: duration of last run", "s", "stat", [
        ("{{repository}}", f"max by (repository) (userpub_cleanup_duration_seconds{{{REPO}}})"),
    ]),
    ("Publisher lock held", "short", "stat", [
        ("{{repository}}", f"max by (repository) (userpub_publisher_lock_held{{{REPO}}})"),
    ]),
    ("Replicas: time since the last successful pull", "s", "timeseries", [
        ("{{repository}} on {{instance}}",
         f"max by (repository, instance) (userpub_replica_age_seconds{{{REPO}}})"),
    ]),
    ("Replicas: pulls per minute", "short", "timeseries", [
        ("{{repository}} {{result}}", f"sum by (repository, result) "
                                      f"(rate(userpub_replica_pulls_total{{{REPO}}}"
                                      f"[$__rate_interval])) * 60"),
    ]),
]


def _panel(index: int, title: str, unit: str, kind: str, targets: list[tuple[str, str]]
           ) -> dict[str, Any]:
    width = 12 if kind == "timeseries" else 6
    panel: dict[str, Any] = {
        "id": index + 1,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }
    if "5 minutes" in title:
        panel["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 0.99}],
        }
    return panel


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (datasource and repository are variables)."""
    return {
        "uid": "cvmfs-userpub",
        "title": "cvmfs-userpub",
        "description": "Is user code available on worker nodes within 5 minutes, and if not, why.",
        "tags": ["cvmfs", "userpub"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "repository", "label": "Repository", "type": "query", "datasource": DS,
             "query": {"query": "label_values(userpub_publisher_lock_held, repository)",
                       "refId": "repository"},
             "definition": "label_values(userpub_publisher_lock_held, repository)",
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "hide": 0, "sort": 1},
        ]},
        "annotations": {"list": []},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard (for tests)."""
    return [expr for _, _, _, targets in PANELS for _, expr in targets]


if __name__ == "__main__":
    json.dump(build_dashboard(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
