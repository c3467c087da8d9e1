"""``make test`` works as any user on any machine (what is missing skips, with its reason);
CI's ``USERPUB_REQUIRE_ALL=1`` turns every skip but a machine_skip into a failure; ``make
test`` installs no system package and ``make system-deps`` installs them only as root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

SAMPLE = '''
import pytest
from tests.requirements import machine_skip, tool

def test_runs():
    pass

def test_plain_skip():
    pytest.skip("needs something")

def test_missing_tool():
    tool("userpub-no-such-tool", "userpub-no-such-package")

def test_machine_limit():
    machine_skip("x86_64 only")

@pytest.mark.skipif(True, reason="a marker")
def test_marker():
    pass
'''


def run_sample(tmp_path: Path, *, require_all: bool, module_skip: bool = False
               ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text("from tests.requirements import pytest_configure\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    if module_skip:
        (tmp_path / "test_module.py").write_text(
            "import pytest\npytest.importorskip('userpub_no_such_module')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("USERPUB_REQUIRE_ALL", None)
    if require_all:
        env["USERPUB_REQUIRE_ALL"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-rfEs", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=100,
                          check=False)


def test_missing_tools_skip_with_their_reason(tmp_path):
    result = run_sample(tmp_path, require_all=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 4 skipped" in result.stdout
    assert ("userpub-no-such-tool is not installed (Debian package userpub-no-such-package: "
            "make system-deps)") in result.stdout


def test_ci_fails_every_skip_but_a_machine_limit(tmp_path):
    result = run_sample(tmp_path, require_all=True)
    assert result.returncode == 1, result.stdout
    # a skip in the test is a failure, one in its setup (a skipif marker) an error
    assert "2 failed, 1 passed, 1 skipped, 1 error" in result.stdout
    failed = set(re.findall(r"(?:FAILED|ERROR) \S+::(\w+)", result.stdout))
    assert failed == {"test_plain_skip", "test_missing_tool", "test_marker"}
    assert "USERPUB_REQUIRE_ALL=1 (CI) runs every test: userpub-no-such-tool is not " \
           "installed" in result.stdout
    assert "this machine cannot run it: x86_64 only" in result.stdout


def test_ci_fails_a_module_skipped_at_collection(tmp_path):
    assert run_sample(tmp_path, require_all=False, module_skip=True).returncode == 0
    result = run_sample(tmp_path, require_all=True, module_skip=True)
    assert result.returncode == 1, result.stdout
    assert "skipped at collection, but USERPUB_REQUIRE_ALL=1" in result.stdout


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=60, check=False)


def test_make_test_installs_no_system_package():
    if shutil.which("make") is None:
        pytest.skip("make is not installed (Debian package make: make system-deps)")
    for target in ("test", "test-fast"):
        planned = make("-n", target)
        assert planned.returncode == 0, planned.stderr
        assert "apt-get" not in planned.stdout and "system-deps" not in planned.stdout, target


def test_system_deps_says_what_it_installs_and_needs_root_for_it(tmp_path):
    if shutil.which("make") is None or shutil.which("dpkg") is None:
        pytest.skip("make and dpkg are not installed (Debian packages make, dpkg)")
    packages = "APT_PACKAGES=coreutils userpub-no-such-package"
    if os.geteuid() == 0:  # as a user would run it: no root, no sudo
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv is not installed (Debian package util-linux)")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "make",
                "--no-print-directory", "system-deps", packages]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT,
                                timeout=60, check=False)
    else:
        result = make("system-deps", packages)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "missing Debian packages: userpub-no-such-package" in out
    assert "coreutils" not in out.split("missing")[1].splitlines()[0]
    assert "run as root: sudo make system-deps" in out
    assert "Could not open lock file" not in out  # apt-get was not tried
