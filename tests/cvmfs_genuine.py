"""The genuine CernVM-FS tools (``../shared/tools/cvmfs``, or ``$CVMFS_TOOLS``) for the tests.

:func:`run_verify_sh` serves a stratum 0 over real HTTP and runs the tools' ``verify.sh`` on it:
``check`` of every revision and tag, ``info``, ``tag_list``, ``lsrepo``, ``list_reflog``, scrub,
a stratum-1 ``pull`` into a scratch replica with scrub and checks of it, ``cvmfs2`` mounts direct
and through the replica (as root, with FUSE), comparison of mounted paths with tarballs, and
``cvmfs_fsck`` of both client caches. Tests skip with one line when the tools are absent.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.unit.test_cvmfs_native_stratum0 import serve_stratum0

TOOLS = Path(os.environ.get("CVMFS_TOOLS", REPO_ROOT.parent / "shared" / "tools" / "cvmfs"))
_STEP = re.compile(r"^(PASS|FAIL)  (\S+)", re.MULTILINE)


def tools_present() -> bool:
    """True when the genuine tools are there."""
    return (TOOLS / "verify.sh").is_file() and (TOOLS / "bin" / "cvmfs_swissknife").is_file()


def genuine_tools() -> Path:
    """The tools' directory; skips the test when they are not there."""
    if not tools_present():
        pytest.skip(f"genuine CernVM-FS tools not found in {TOOLS} (set CVMFS_TOOLS)")
    return TOOLS


def swissknife(*args: str, stdin: bytes = b"") -> bytes:
    """Run ``cvmfs_swissknife`` with the tools' libraries; its standard output."""
    tools = genuine_tools()
    env = dict(os.environ, LD_LIBRARY_PATH=str(tools / "lib"))
    return subprocess.run([str(tools / "bin" / "cvmfs_swissknife"), *args], input=stdin,
                          capture_output=True, check=True, env=env, timeout=120).stdout


def _swissknife_run(args: list[str]) -> str:
    """Run ``cvmfs_swissknife`` (skip without the tools); assert exit 0; stdout + stderr."""
    tools = genuine_tools()
    env = dict(os.environ, LD_LIBRARY_PATH=str(tools / "lib"))
    done = subprocess.run([str(tools / "bin" / "cvmfs_swissknife"), *args], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    return output


def genuine_check(repository: str | Path, scratch: Path, *, fqrn: str | None = None,
                  key: Path | None = None) -> str:
    """``cvmfs_swissknife check -c`` of a directory or URL (signatures too for a URL, with
    ``fqrn`` and ``key``); assert it finds no problem and return its output."""
    scratch.mkdir(parents=True, exist_ok=True)
    argv = ["check", "-c", "-r", str(repository), "-t", str(scratch)]
    if fqrn is not None and key is not None:
        argv += ["-N", fqrn, "-k", str(key)]
    output = _swissknife_run(argv)
    assert "no problems found" in output, output[-2000:]
    return output


def genuine_scrub(data: Path) -> None:
    """``cvmfs_swissknife scrub`` of a ``data/`` directory: every object's name is its hash."""
    _swissknife_run(["scrub", "-r", str(data)])


def library_dir(tools: Path, work: Path) -> Path:
    """The tools' ``lib/`` with its ``.so`` links as real symbolic links.

    Copies of the tools may hold the links as small text files naming their target, which
    the dynamic loader of ``cvmfs2`` cannot load ("file too short").
    """
    out = work / "lib"
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted((tools / "lib").iterdir()):
        link = out / entry.name
        target: str | Path = entry.resolve()
        if not entry.is_symlink() and entry.stat().st_size < 256:
            named = entry.read_text(errors="replace").strip()
            if (tools / "lib" / named).is_file():
                target = named
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return out


def can_mount() -> str | None:
    """None when ``cvmfs2`` can mount here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 is not installed (Debian packages fuse3 libfuse3-3)"
    return None


@dataclass(frozen=True)
class Verdict:
    """What ``verify.sh`` said: its exit status (failed steps), output and steps."""

    returncode: int
    output: str
    steps: dict[str, bool]

    def failed(self) -> list[str]:
        """Names of the failed steps."""
        return [name for name, ok in self.steps.items() if not ok]


def run_verify_sh(root: Path, fqrn: str, key: Path, work: Path,
                  pairs: dict[str, Path] | None = None) -> Verdict:
    """Serve ``root`` as ``/cvmfs/<fqrn>`` and run ``verify.sh`` on it (``pairs``: path -> tarball)."""
    tools = genuine_tools()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WORK=str(work / "verify"), S0_DIR=str(root),
               CVMFS_LIB=str(library_dir(tools, work)))
    why_not = can_mount()
    if why_not is not None:
        warnings.warn(f"verify.sh without its mount and cache steps: {why_not}", stacklevel=2)
        env["NO_MOUNT"] = "1"
    args = [f"{tarball}:{path}" for path, tarball in (pairs or {}).items()]
    with serve_stratum0({fqrn: root}) as base:
        done = subprocess.run(["bash", str(tools / "verify.sh"), f"{base}/cvmfs/{fqrn}", fqrn,
                               str(key), *args], capture_output=True, text=True, env=env,
                              timeout=1200, check=False)
    output = done.stdout + done.stderr
    steps = {name: verdict == "PASS" for verdict, name in _STEP.findall(output)}
    if done.returncode == 0:
        shutil.rmtree(work / "verify", ignore_errors=True)
    return Verdict(done.returncode, output, steps)


def assert_genuine_clean(verdict: Verdict, *, mounted: bool = True) -> None:
    """Every step passed, and the replication, replica and (when possible) mount steps ran."""
    assert verdict.returncode == 0 and not verdict.failed(), verdict.output
    expected = ["check_trunk", "scrub_s0", "pull", "scrub_s1", "check_s1_local", "check_s1_http"]
    if mounted and can_mount() is None:
        expected += ["mount_s0", "read_all_s0", "fsck_cache_s0", "mount_s1", "read_all_s1",
                     "fsck_cache_s1"]
    missing = [step for step in expected if step not in verdict.steps]
    assert not missing, f"steps not run: {missing}\n{verdict.output}"
