"""A real Prometheus server for tests (Debian's ``prometheus`` package)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import wait_for
from tests.requirements import tool


def free_ports(count: int) -> int:
    """A base port such that base .. base+count-1 are free right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def require_tool(name: str) -> str:
    """Path of a tool of Debian's prometheus package (prometheus, promtool), or skip clearly."""
    return tool(name, "prometheus")


class Prometheus:
    """A throwaway Prometheus scraping ``targets`` every second, with our rules loaded."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]], rules: Path) -> None:
        binary = require_tool("prometheus")
        self.port = free_ports(1)
        workdir.mkdir(parents=True, exist_ok=True)
        scrape = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: {json.dumps(addrs)}\n"
            for job, addrs in targets.items())
        # the same rules, evaluated every second instead of every 30 s
        fast_rules = workdir / rules.name
        fast_rules.write_text(rules.read_text().replace("interval: 30s", "interval: 1s"))
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          f"rule_files:\n  - {fast_rules}\nscrape_configs:\n{scrape}")
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, "prometheus did not become ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises on a PromQL error."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr, "time": f"{time.time():.3f}"}))
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None when empty)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def targets_up(self) -> bool:
        """True when every target has been scraped successfully at least once."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/targets",
                                    timeout=5) as r:
            active = json.load(r)["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        """Terminate the server."""
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()
