"""``userpub wait`` and ``scripts/userpub-wait.sh``: every repository each round, timeouts."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from userpub.cli import main
from userpub_client.wait import candidates, wait_for

SCRIPT = REPO_ROOT / "scripts" / "userpub-wait.sh"
REPOS = ["repo1.example.org", "repo2.example.org"]
SHELLS = [s for s in ("sh", "dash", "bash", "busybox") if shutil.which(s)]
pytestmark = pytest.mark.timeout(60)


def appear_later(path: Path, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, lambda: path.mkdir(parents=True))
    timer.start()
    return timer


def test_candidates():
    assert candidates("g/x", REPOS) == (Path("/cvmfs/repo1.example.org/sw/g/x"),
                                        Path("/cvmfs/repo2.example.org/sw/g/x"))
    assert candidates("x", ["r"], "/m", "") == (Path("/m/r/x"),)


def test_found_at_once(tmp_path):
    (tmp_path / REPOS[1] / "sw" / "g" / "x").mkdir(parents=True)
    result = wait_for("g/x", REPOS, mount_root=str(tmp_path), timeout=0,
                      sleep=lambda _s: pytest.fail("no sleep needed"))
    assert result.path == tmp_path / REPOS[1] / "sw" / "g" / "x"
    assert result.rounds == 1


def test_appears_after_a_delay_in_any_repository(tmp_path):
    target = tmp_path / REPOS[1] / "sw" / "g" / "x"
    timer = appear_later(target, 0.5)
    try:
        result = wait_for("g/x", REPOS, mount_root=str(tmp_path), timeout=20, interval=0.1)
    finally:
        timer.join()
    assert result.path == target
    assert result.rounds > 1
    assert 0.4 <= result.waited < 20


def test_a_file_is_not_enough(tmp_path):
    (tmp_path / REPOS[0] / "sw" / "g").mkdir(parents=True)
    (tmp_path / REPOS[0] / "sw" / "g" / "x").write_text("")
    assert wait_for("g/x", REPOS, mount_root=str(tmp_path), timeout=0).path is None


def test_timeout_with_a_fake_clock(tmp_path):
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s
    result = wait_for("g/x", REPOS, mount_root=str(tmp_path), timeout=40, interval=15,
                      clock=lambda: now[0], sleep=sleep)
    assert result.path is None
    assert sleeps == [15, 15, 10]  # the last round is made at the deadline
    assert result.rounds == 4
    assert len(result.candidates) == 2


def test_wait_command(tmp_path, capsys):
    target = tmp_path / REPOS[0] / "sw" / "g" / "x"
    timer = appear_later(target, 0.3)
    try:
        rc = main(["wait", "g/x", "--repos", ",".join(REPOS), "--mount-root", str(tmp_path),
                   "--interval", "0.1", "--timeout", "20"])
    finally:
        timer.join()
    out, err = capsys.readouterr()
    assert (rc, out) == (0, f"{target}\n")
    assert "waiting up to 20 s for g/x in 2 repositories" in err


def test_wait_command_timeout(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USERPUB_REPOS", " ".join(REPOS))
    rc = main(["wait", "g/x", "--mount-root", str(tmp_path), "--interval", "0.1",
               "--timeout", "0.3"])
    out, err = capsys.readouterr()
    assert (rc, out) == (7, "")
    assert "timeout: g/x did not appear within 0.3 s" in err
    for repo in REPOS:
        assert str(tmp_path / repo / "sw" / "g" / "x") in err


def test_wait_command_usage(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("USERPUB_REPOS", raising=False)
    assert main(["wait", "g/x", "--mount-root", str(tmp_path)]) == 2
    assert main(["wait", "../x", "--repos", "r", "--timeout", "0"]) == 1
    assert main(["wait", "g/x", "--repos", "r", "--interval", "0"]) == 2
    assert "--repos" in capsys.readouterr().err


# -- the shell variant -----------------------------------------------------------------------


def run_sh(shell: str, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    argv = [shell, "sh", str(SCRIPT), *args] if shell == "busybox" else [shell, str(SCRIPT), *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.mark.parametrize("shell", SHELLS)
def test_shell_found_after_a_delay(tmp_path, shell):
    target = tmp_path / REPOS[1] / "sw" / "g" / "x"
    timer = appear_later(target, 1.0)
    try:
        done = run_sh(shell, "g/x", "--repos", ",".join(REPOS), "--mount-root", str(tmp_path),
                      "--interval", "1", "--timeout", "20")
    finally:
        timer.join()
    assert (done.returncode, done.stdout) == (0, f"{target}\n"), done.stderr
    assert "waiting up to 20 s" in done.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_shell_timeout(tmp_path, shell):
    start = time.monotonic()
    done = run_sh(shell, "g/x", "--mount-root", str(tmp_path), "--interval", "1",
                  "--timeout", "2", env={"USERPUB_REPOS": ",".join(REPOS)})
    assert done.returncode == 7
    assert done.stdout == ""
    assert "timeout: g/x did not appear within 2 s" in done.stderr
    assert str(tmp_path / REPOS[1] / "sw" / "g" / "x") in done.stderr
    assert 1.5 <= time.monotonic() - start < 15


@pytest.mark.parametrize("shell", SHELLS)
def test_shell_options(tmp_path, shell):
    (tmp_path / "r" / "x").mkdir(parents=True)
    done = run_sh(shell, "x", "--repos=r", f"--mount-root={tmp_path}", "--prefix=",
                  "--timeout=0", "-q")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{tmp_path}/r/x\n", "")
    for bad in (["g/x"], ["--repos", "r"], ["g/x", "--repos", "r", "--timeout", "soon"],
                ["g/x", "--repos", "r", "--bogus"]):
        assert run_sh(shell, *bad).returncode == 2, bad
    for cid in ("../x", "/abs", "a/b/c", ".hidden", "a/.b", "a//b"):
        done = run_sh(shell, cid, "--repos", "r", "--timeout", "0")
        assert done.returncode == 1, cid
        assert "invalid CID" in done.stderr
    assert "Exit codes" in run_sh(shell, "--help").stdout
