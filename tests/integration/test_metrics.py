"""Metrics through a real Prometheus: exporters, rules and every dashboard query."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from metrics.dashboard import build_dashboard, dashboard_queries
from spool import Spool
from tests.helpers import Daemon, make_tarball, run_userpub, wait_for
from tests.pki import IngestProcess, TestPKI, ingest_config
from tests.prometheus import Prometheus, free_ports, require_tool
from userpub.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "metrics" / "rules" / "userpub.rules.yml"


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
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
    pki = TestPKI(tmp_path / "pki")
    base = free_ports(3)  # two publishers, then the janitor
    hour = time.localtime().tm_hour  # repository 1's cleanup slot is this very hour
    config = ingest_config(tmp_path / "site", pki)
    text = config.path.read_text()
    text = text.replace('publisher_listen = "127.0.0.1:0"', f'publisher_listen = "127.0.0.1:{base}"')
    text = text.replace('janitor_listen = "127.0.0.1:0"', f'janitor_listen = "127.0.0.1:{base + 2}"')
    config.path.write_text(text + f"\n[janitor]\nstart_hour = {hour}\n")
    config = load_config(config.path)
    pubs = [Daemon(config.path, "publisher", "--repo", r.name, log=tmp_path / f"{r.name}.log")
            for r in config.hosted]
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    janitor = Daemon(config.path, "janitor", log=tmp_path / "janitor.log")
    prom = None
    try:
        for p in pubs:
            p.wait_log("publisher ready")
        exporters = {"userpub-publisher": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"],
                     "userpub-ingest": [ingest.http], "userpub-janitor": [f"127.0.0.1:{base + 2}"]}
        wait_for(lambda: _answers(base + 2), 30, janitor.log)
        for addresses in exporters.values():
            for address in addresses:
                text = scrape(address)
                promtool_check_metrics(text)
                # the standard collectors of every process (CPU, memory, descriptors, Python)
                for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                             "process_open_fds", "process_start_time_seconds", "python_info",
                             "python_gc_collections_total"):
                    assert f"\n{name}" in text, (address, name)
        prom = Prometheus(tmp_path / "prom", exporters, RULES)
        wait_for(prom.targets_up, 30, "targets not up")
        time.sleep(3)  # a few scrapes at zero, so that rates see the increase
        spool = Spool(config.server.spool)
        url = f"https://{ingest.https}/pubapi"
        sizes = 0
        for i in range(4):
            tarball = make_tarball(tmp_path / f"ok{i}.tar.gz", {f"f{i}": b"x" * (1000 * (i + 1))})
            sizes += tarball.stat().st_size
            with tarball.open("rb") as body:
                answer = requests.post(f"{url}/publish", params={"cid": f"grp/ok{i}"}, data=body,
                                       cert=pki.cert("proxy"), verify=str(pki.ca_file), timeout=30)
            assert answer.text == "OK\n"
        bad = tmp_path / "bad.tar.gz"
        bad.write_bytes(b"this is not a tarball at all" * 10)
        run_userpub(config.path, "drop", str(bad), "--cid", "grp/bad")
        refused = requests.get(f"{url}/exists", params={"cid": "grp/ok0"}, verify=str(pki.ca_file),
                               timeout=30)
        assert refused.status_code == 403
        wait_for(lambda: spool.depth().incoming == 0 and spool.depth().failed == 1
                 and not any(any(spool.iter_active(r.name)) for r in config.hosted), 30)

        def settled():
            return prom.value('sum(userpub_publishes_total{result="published"})') == 4 \
                and prom.value("sum(userpub_publish_failures_total)") == 1 \
                and prom.value('sum(max by (server) (userpub_queue_entries{state="failed"}))') == 1 \
                and prom.value('sum(userpub_http_requests_total{route="publish"})') == 4
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
        assert prom.value("count(process_resident_memory_bytes)") == 4  # every daemon
        assert prom.value('sum(userpub_http_requests_total{route="publish",status="200"})') == 4
        assert prom.value("sum(userpub_upload_bytes_total)") == sizes
        assert prom.value("sum(userpub_auth_failures_total)") == 1
        # the janitor cleaned repository 1 at start (its slot is this hour)
        assert prom.value('sum(userpub_cleanup_runs_total{repository="repo1.example.org"})') == 1
        last = prom.value('max(userpub_cleanup_last_success_timestamp_seconds'
                          '{repository="repo1.example.org"})')
        assert last is not None and abs(last - time.time()) < 120
        # the recording rules: every publish was visible well within 300 s
        assert prom.value("userpub_publish_within_300s:ratio_rate1h") == pytest.approx(1.0)
        for r in prom.query("repository:userpub_publish_within_300s:ratio_rate1h"):
            value = float(r["value"][1])
            assert math.isnan(value) or value == pytest.approx(1.0)
        p99 = prom.value("histogram_quantile(0.99, sum by (le) "
                         "(rate(userpub_publish_latency_seconds_bucket[1h])))")
        assert p99 is not None and 0 < p99 <= 10
        # every dashboard query is valid PromQL against real data, and most have data
        answered = [bool(prom.query(concrete(expr))) for expr in dashboard_queries()]
        assert sum(answered) >= 0.8 * len(answered), answered
        # the dashboard's 5-minute stat agrees
        within = prom.value(concrete(dashboard_queries()[3]))
        assert within == pytest.approx(1.0)
        # no alert is even pending for a healthy pipeline (one rejected tarball is no trend)
        assert prom.query("ALERTS") == []
    finally:
        if prom is not None:
            prom.stop()
        janitor.stop()
        ingest.stop()
        for p in pubs:
            p.stop()


def _answers(port: int) -> bool:
    try:
        scrape(f"127.0.0.1:{port}")
    except OSError:
        return False
    return True
