"""A healthy system logs no ERROR: a fresh site started, used and stopped during an upload;
a janitor that starts before the publishers have created their trees; a publisher stopped
while events arrive in incoming/."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from metrics import PublisherMetrics
from publisher.daemon import Publisher
from publisher.repositories import open_repository
from publisher.repositories.catalog import Catalog
from spool import Spool
from tests.helpers import REPO_ROOT, Daemon, userpub_cmd, wait_for, write_config
from userpub.config import load_config
from userpub.daemon import Waker

REPOS = ("user1.example.org", "user2.example.org")
pytestmark = pytest.mark.timeout(240)


def errors(text: str) -> list[str]:
    """Log lines at ERROR or above, and tracebacks."""
    return [line for line in text.splitlines()
            if re.search(r"\] (ERROR|CRITICAL) ", line) or line.startswith("Traceback")]


def fresh_site(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``userpub init`` as a new operator runs it; the example's export lines as a dict; the
    janitor's rota starts this hour, so that it cleans user1 as soon as it starts."""
    site = tmp_path / "site"
    init = subprocess.run([sys.executable, "-m", "userpub", "init", str(site)],
                          capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    exports = {}
    for line in init.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        exports[name] = shlex.split(value)[0]
    config = site / "userpub.toml"
    text = config.read_text()
    assert "start_hour = 3" in text
    config.write_text(text.replace("start_hour = 3", f"start_hour = {time.localtime().tm_hour}"))
    return config, exports


def test_a_janitor_started_before_the_publishers_waits_for_their_trees(tmp_path):
    config, _ = fresh_site(tmp_path)
    janitor = Daemon(config, "janitor", log=tmp_path / "janitor.log")
    publishers: list[Daemon] = []
    try:
        wait_for(lambda: "cleanup waits until the publisher of" in janitor.log()
                 or errors(janitor.log()), 60, janitor.log)
        assert errors(janitor.log()) == [], janitor.log()
        assert not (config.parent / "repos").exists()  # the janitor makes no repository
        publishers = [Daemon(config, "publisher", "--repo", r, log=tmp_path / f"{r}.log")
                      for r in REPOS]
        janitor.wait_log(f"{REPOS[0]}: cleanup success", 60)
    finally:
        for daemon in (*publishers, janitor):
            daemon.stop()
    for daemon in (*publishers, janitor):
        assert errors(daemon.log()) == [], daemon.log()


def test_a_fresh_site_started_used_and_stopped_during_an_upload_logs_no_error(tmp_path):
    config, exports = fresh_site(tmp_path)
    env = {**os.environ, **exports}
    env.pop("BEARER_TOKEN", None)
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen(userpub_cmd(config, "run"), stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO_ROOT)
    logged = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: "listening on https://" in logged()
                 and logged().count("publisher ready") == 2, 60, logged)
        wait_for(lambda: f"{REPOS[0]}: cleanup success" in logged(), 60, logged)
        sample = config.parent / "sample.tar.gz"
        published = subprocess.run([sys.executable, "-m", "userpub", "client", "publish",
                                    str(sample), "--group", "demo"], env=env, cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=120, check=False)
        assert published.returncode == 0, published.stderr + logged()
        assert (Path(published.stdout.strip()) / "run.sh").is_file()

        # an upload in flight when the service is told to stop: it is answered OK and kept
        payload = (config.parent / "big.tar")
        payload.write_bytes(b"\0" * (4 << 20))  # an empty tar archive, padded
        context = ssl.create_default_context(cafile=exports["USERPUB_CA_BUNDLE"])
        context.load_cert_chain(exports["X509_USER_PROXY"])
        port = int(exports["USERPUB_SERVERS"].rpartition(":")[2])
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=120)
        conn.putrequest("POST", "/pubapi/publish?cid=demo%2Fin-flight")
        conn.putheader("Content-Length", str(payload.stat().st_size))
        conn.endheaders()
        data = payload.read_bytes()
        conn.send(data[: len(data) // 2])
        tmp = Spool(load_config(config).server.spool).tmp
        wait_for(lambda: any(tmp.iterdir()), 30, logged)  # the ingest is writing it
        run.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping: no new connections" in logged(), 30, logged)
        conn.send(data[len(data) // 2:])
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"OK\n"), logged()
        conn.close()
        assert run.wait(120) == 0, logged()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in re.findall(r"started \S+ \(pid (\d+)\)", logged()):
            with contextlib.suppress(OSError):  # only a daemon of this site left behind
                if str(config).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
    text = logged()
    assert errors(text) == [], text
    assert re.search(r"userpub\.supervisor\[\d+\] INFO stopped$", text.rstrip()), text[-2000:]
    status = subprocess.run(userpub_cmd(config, "status", "demo/in-flight"), cwd=REPO_ROOT,
                            capture_output=True, text=True, check=False)
    assert status.stdout.strip().split(":")[0] in ("QUEUED", "PRESENT", "FAILED"), status


def test_stopping_a_publisher_while_events_arrive_logs_no_error(tmp_path, caplog):
    """watchdog's emitter logs an ERROR when an event meets an observer being stopped."""
    config = load_config(write_config(tmp_path / "site", 1))
    repo = config.repositories[0]
    spool = Spool(config.server.spool)
    caplog.set_level(logging.WARNING)
    stop = threading.Event()
    events = [0]

    def storm() -> None:  # names the publisher ignores: only the emitter sees them
        while not stop.is_set():
            name = spool.incoming / f".storm-{events[0]}.part"
            name.touch()
            name.unlink()
            events[0] += 1

    for _ in range(30):
        publisher = Publisher(config, repo, open_repository(config, repo), spool,
                              Catalog.from_config(config), PublisherMetrics(CollectorRegistry()),
                              Waker())
        publisher.initialize()
        stop.clear()
        thread = threading.Thread(target=storm)
        thread.start()
        try:
            start = events[0]
            wait_for(lambda s=start: events[0] > s + 200, 30)  # the watch is busy
            publisher.shutdown()
        finally:
            stop.set()
            thread.join()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
