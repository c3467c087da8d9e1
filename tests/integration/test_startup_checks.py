"""Setups that cannot start: ``userpub check-config`` finds each problem, changing nothing,
and the daemon that meets it stops at once with the same one-line ``fatal:`` (exit 1, no
traceback). A missing repository root is never made, unless ``create = true``."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_userpub
from tests.pki import TestPKI, ingest_config

REPO1 = "repo1.example.org"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site(tmp_path: Path, pki: TestPKI, edits: dict[str, str] | None = None) -> Path:
    """A valid two-repository site with an ingest, its text edited (old -> new, once each)."""
    path = ingest_config(tmp_path / "site", pki).path
    text = path.read_text()
    for old, new in (edits or {}).items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def fatal_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``fatal:`` lines of a command that must have failed cleanly."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fatal: ")]
    assert lines, result.stderr
    return lines


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return run_userpub(config, "check-config", check=False, timeout=60)


DAEMONS = {
    "ingest": ("ingest",),
    "publisher": ("publisher", "--repo", REPO1),
    "janitor": ("janitor",),
}


def daemon(config: Path, name: str) -> subprocess.CompletedProcess[str]:
    return run_userpub(config, *DAEMONS[name], check=False, timeout=60)


def test_a_valid_site_is_valid_and_check_config_makes_nothing(tmp_path, pki):
    config = site(tmp_path, pki)
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout
    assert not (config.parent / "spool").exists()
    assert not (config.parent / "state").exists()


@pytest.mark.parametrize(("edit", "expected", "daemons"), [
    ({"hostcert.pem": "missing-hostcert.pem"}, r"cannot load host certificate .*missing-hostcert",
     ["ingest"]),
    ({"certificates": "no-such-ca-dir"}, r"ca_dir .*no-such-ca-dir: not a directory", ["ingest"]),
    ({'spool = "spool"': 'spool = "blocker/spool"'}, r"spool .*blocker/spool: Not a directory",
     ["ingest", "publisher", "janitor"]),
    ({'state = "state"': 'state = "blocker/state"'}, r"state .*blocker/state.*: Not a directory",
     ["publisher", "janitor"]),
    ({"grid-mapfile": "certificates"}, r"grid-mapfile .*certificates: Is a directory",
     ["ingest"]),
])
def test_each_unusable_setup_is_one_fatal_line_for_check_config_and_the_daemon(
        tmp_path, pki, edit, expected, daemons):
    config = site(tmp_path, pki, edit)
    (config.parent / "blocker").write_text("a file where a directory should be\n")
    found = fatal_lines(check(config))
    assert any(re.search(expected, line) for line in found), found
    for name in daemons:
        lines = fatal_lines(daemon(config, name))
        assert any(re.search(expected, line) for line in lines), (name, lines)


def test_a_missing_root_is_never_made(tmp_path, pki):
    config = site(tmp_path, pki)
    root = config.parent / "repos" / "repo1"
    root.rmdir()
    expected = f"repository {REPO1}: root {root} does not exist"
    assert any(expected in line for line in fatal_lines(check(config)))
    assert any(expected in line for line in fatal_lines(daemon(config, "publisher")))
    assert not root.exists()


def test_create_true_lets_the_publisher_make_the_root(tmp_path, pki):
    config = site(tmp_path, pki, {'root = "repos/repo1"': 'root = "repos/repo1"\ncreate = true'})
    root = config.parent / "repos" / "repo1"
    root.rmdir()
    assert check(config).returncode == 0
    assert not root.exists()  # check-config makes nothing
    once = run_userpub(config, "publisher", "--repo", REPO1, "--once", check=False)
    assert once.returncode == 0, once.stderr
    assert (root / "sw").is_dir()


def test_two_daemons_on_one_port(tmp_path, pki):
    port = free_port()
    config = site(tmp_path, pki, {
        'http_listen = "127.0.0.1:0"': f'http_listen = "127.0.0.1:{port}"',
        'janitor_listen = "127.0.0.1:0"': f'janitor_listen = "0.0.0.0:{port}"'})
    expected = (f"metrics.janitor_listen (0.0.0.0:{port}) and ingest.http_listen "
                f"(127.0.0.1:{port}) use the same port")
    assert expected in fatal_lines(check(config))[0]
    for name in DAEMONS:
        assert any(expected in line for line in fatal_lines(daemon(config, name))), name


def test_a_port_in_use_is_noted_by_check_config_and_fatal_for_the_daemon(tmp_path, pki):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = site(tmp_path, pki, {'\nlisten = "127.0.0.1:0"': f'\nlisten = "127.0.0.1:{port}"'})
        checked = check(config)  # the running service itself holds its ports
        assert checked.returncode == 0, checked.stderr
        assert f"note: 127.0.0.1:{port} (ingest.listen) is in use right now" in checked.stderr
        lines = fatal_lines(daemon(config, "ingest"))
        assert lines == [f"fatal: cannot listen on https 127.0.0.1:{port}: Address already in use"]


def test_cvmfs_native_keys_are_checked(tmp_path):
    from tests.helpers import write_config

    config = write_config(tmp_path / "site", 1, backend="cvmfs-native")
    expected = "is missing: run `userpub keys init repo1.example.org`"
    assert any(expected in line for line in fatal_lines(check(config)))
    assert any(expected in line for line in fatal_lines(daemon(config, "publisher")))
    assert run_userpub(config, "keys", "init", REPO1).returncode == 0
    assert check(config).returncode == 0
