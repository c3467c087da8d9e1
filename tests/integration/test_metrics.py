"""Metrics through a real Prometheus: exporters, rules and every dashboard query."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from metrics.dashboard import build_dashboard, dashboard_queries
from spool import Spool
from tests.helpers import Daemon, make_tarball, run_userpub, wait_for, write_config
from tests.prometheus import Prometheus, free_ports, require_tool
from userpub.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "metrics" / "rules" / "userpub.rules.yml"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def promtool_check_metrics(text: str) -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_rules_file_is_valid():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_dashboard_is_the_built_one():
    committed = json.loads((ROOT / "metrics" / "dashboards" / "userpub.json").read_text())
    hint = "regenerate: python -m metrics.dashboard > metrics/dashboards/userpub.json"
    assert committed == build_dashboard(), hint
    variables = {v["name"]: v for v in committed["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["repository"]["includeAll"]
    for panel in committed["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"


def concrete(expr: str) -> str:
    return expr.replace("$repository", ".*").replace("$__rate_interval", "1m")


def test_pipeline_metrics_through_prometheus(tmp_path):
    base = free_ports(2)
    config_path = write_config(tmp_path / "site", extra="")
    text = config_path.read_text().replace('publisher_listen = "127.0.0.1:0"',
                                           f'publisher_listen = "127.0.0.1:{base}"')
    config_path.write_text(text)
    config = load_config(config_path)
    pubs = [Daemon(config_path, "publisher", "--repo", r.name, log=tmp_path / f"{r.name}.log")
            for r in config.hosted]
    prom = None
    try:
        for p in pubs:
            p.wait_log("publisher ready")
        for port in (base, base + 1):
            promtool_check_metrics(scrape(port))
        prom = Prometheus(tmp_path / "prom",
                          {"userpub-publisher": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]},
                          RULES)
        wait_for(prom.targets_up, 30, "targets not up")
        time.sleep(3)  # a few scrapes at zero, so that rates see the increase
        spool = Spool(config.server.spool)
        for i in range(4):
            tarball = make_tarball(tmp_path / f"ok{i}.tar.gz", {f"f{i}": b"x" * (1000 * (i + 1))})
            run_userpub(config_path, "drop", str(tarball), "--cid", f"grp/ok{i}")
        bad = tmp_path / "bad.tar.gz"
        bad.write_bytes(b"this is not a tarball at all" * 10)
        run_userpub(config_path, "drop", str(bad), "--cid", "grp/bad")
        wait_for(lambda: spool.depth().incoming == 0 and spool.depth().failed == 1
                 and not any(any(spool.iter_active(r.name)) for r in config.hosted), 30)

        def settled():
            return prom.value('sum(userpub_publishes_total{result="published"})') == 4 \
                and prom.value("sum(userpub_publish_failures_total)") == 1 \
                and prom.value('sum(max by (server) (userpub_queue_entries{state="failed"}))') == 1
        wait_for(settled, 30, "prometheus did not see the publishes", interval=0.5)
        time.sleep(3)  # let the recording rules evaluate
        assert prom.value('sum(max by (server) (userpub_queue_entries{state="incoming"}))') == 0
        assert prom.value("max(userpub_queue_oldest_entry_age_seconds)") == 0
        assert prom.value('sum(userpub_publish_failures_total{reason="invalid_tarball"})') == 1
        assert prom.value("sum(userpub_published_files_total)") == 4
        assert prom.value("sum(userpub_published_bytes_total)") == 1000 + 2000 + 3000 + 4000
        assert prom.value("sum(userpub_publish_latency_seconds_count)") == 4
        assert prom.value('sum(userpub_publish_latency_seconds_bucket{le=~"10|10.0"})') == 4
        assert prom.value("sum(userpub_publisher_lock_held)") == 2
        # the recording rules: every publish was visible well within 300 s
        assert prom.value("userpub_publish_within_300s:ratio_rate1h") == pytest.approx(1.0)
        for r in prom.query("repository:userpub_publish_within_300s:ratio_rate1h"):
            value = float(r["value"][1])
            assert math.isnan(value) or value == pytest.approx(1.0)
        p99 = prom.value("histogram_quantile(0.99, sum by (le) "
                         "(rate(userpub_publish_latency_seconds_bucket[1h])))")
        assert p99 is not None and 0 < p99 <= 10
        # every dashboard query is valid PromQL against real data
        answered = 0
        for expr in dashboard_queries():
            result = prom.query(concrete(expr))
            answered += bool(result)
        assert answered >= len(dashboard_queries()) // 2
        # the dashboard's 5-minute stat agrees
        within = prom.value(concrete(dashboard_queries()[3]))
        assert within == pytest.approx(1.0)
    finally:
        if prom is not None:
            prom.stop()
        for p in pubs:
            p.stop()
