"""The genuine CernVM-FS tools (``../shared/tools/cvmfs``, see its README): tests skip without them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

TOOLS = Path(os.environ.get("USERPUB_CVMFS_TOOLS",
                            REPO_ROOT.parent / "shared" / "tools" / "cvmfs"))


def swissknife() -> Path:
    """The genuine ``cvmfs_swissknife``, or skip the test."""
    path = TOOLS / "bin" / "cvmfs_swissknife"
    if not os.access(path, os.X_OK):
        pytest.skip(f"the genuine CernVM-FS tools are not at {TOOLS} (USERPUB_CVMFS_TOOLS)")
    return path


def genuine_check(repository: str | Path, scratch: Path, *, fqrn: str | None = None,
                  key: Path | None = None) -> str:
    """``cvmfs_swissknife check -c`` of a directory or URL (signatures too for a URL);
    assert it finds no problem and return its output."""
    tool = swissknife()
    scratch.mkdir(parents=True, exist_ok=True)
    argv = [str(tool), "check", "-c", "-r", str(repository), "-t", str(scratch)]
    if fqrn is not None and key is not None:
        argv += ["-N", fqrn, "-k", str(key)]
    env = dict(os.environ, LD_LIBRARY_PATH=str(TOOLS / "lib"))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "no problems found" in output, output[-2000:]
    return output


def genuine_scrub(data: Path) -> None:
    """``cvmfs_swissknife scrub`` of a ``data/`` directory: every object's name is its hash."""
    tool = swissknife()
    env = dict(os.environ, LD_LIBRARY_PATH=str(TOOLS / "lib"))
    done = subprocess.run([str(tool), "scrub", "-r", str(data)], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
