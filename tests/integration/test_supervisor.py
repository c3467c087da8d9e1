"""``userpub run``: a daemon that cannot start (a ``fatal:`` line) stops everything, and the
supervisor exits 1 with that line instead of restarting it forever; a clean stop says
``stopped`` last."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, userpub_cmd, wait_for
from tests.pki import TestPKI, ingest_config

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too (the supervisor reaps its children: only for a moment)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started(text: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", text)}


@contextlib.contextmanager
def supervisor(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``userpub run``; whatever outlives the test (it, or a child it left) is killed."""
    with log.open("wb") as out:
        proc = subprocess.Popen(userpub_cmd(config, "run"), stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started(log.read_text()).values():  # only a daemon of this site
            with contextlib.suppress(OSError):
                if alive(pid) and str(config).encode() in Path(f"/proc/{pid}/cmdline"
                                                               ).read_bytes():
                    os.kill(pid, signal.SIGKILL)


def test_a_port_in_use_stops_everything_with_the_fatal_line(tmp_path, pki):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ingest_config(tmp_path / "site", pki, listen=f"127.0.0.1:{port}")
        log = tmp_path / "run.log"
        with supervisor(config.path, log) as proc:
            assert proc.wait(120) == 1, log.read_text()
    text = log.read_text()
    line = f"cannot listen on https 127.0.0.1:{port}: Address already in use"
    assert f"\nfatal: {line}\n" in text  # the child's own line, passed through
    assert text.splitlines()[-1] == f"fatal: ingest: {line}", text  # the supervisor's last
    assert "restarting" not in text
    assert text.count("started ingest") == 1
    children = started(text)
    assert set(children) == {"ingest", "publisher:repo1.example.org",
                             "publisher:repo2.example.org", "janitor"}
    assert not any(alive(pid) for pid in children.values()), text


def test_a_publisher_that_cannot_start_stops_the_others(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki)
    root = config.repository("repo2.example.org").root
    assert root is not None
    root.rmdir()
    log = tmp_path / "run.log"
    with supervisor(config.path, log) as proc:
        assert proc.wait(120) == 1, log.read_text()
    text = log.read_text()
    assert text.splitlines()[-1] == (f"fatal: publisher:repo2.example.org: repository "
                                     f"repo2.example.org: root {root} does not exist (create "
                                     "it, or set create = true in its [[repository]] to let "
                                     "the publisher make it)"), text
    assert "restarting" not in text
    assert not root.exists()
    assert not any(alive(pid) for pid in started(text).values()), text


def test_a_clean_stop_ends_with_stopped(tmp_path, pki):
    config = ingest_config(tmp_path / "site", pki)
    log = tmp_path / "run.log"
    with supervisor(config.path, log) as proc:
        wait_for(lambda: log.read_text().count("publisher ready") == 2
                 and "listening on https://" in log.read_text(), 60, log.read_text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()
    last = log.read_text().splitlines()[-1]
    assert re.fullmatch(r"\S+ \S+ userpub\.supervisor\[\d+\] INFO stopped", last), last
