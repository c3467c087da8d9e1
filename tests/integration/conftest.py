"""Fixtures of the integration tests: the cvmfs_server test double on PATH."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cvmfs_server_double import DOUBLE_DIR, CvmfsServerDouble, mounts_available
from tests.helpers import cvmfs_double_root


@pytest.fixture(scope="session")
def _double_mounts() -> None:
    """Skip (checked once per session) where the double cannot mount: it needs root."""
    why = mounts_available()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def cvmfs_double(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 _double_mounts: None) -> Iterator[CvmfsServerDouble]:
    """The cvmfs_server double of the host configured by ``write_config(tmp_path / "site")``.

    ``cvmfs_server`` on PATH is the double, for this process and the daemons it starts.
    The test creates the repositories (``mkfs``); they are unmounted and removed afterwards.
    """
    double = CvmfsServerDouble(cvmfs_double_root(tmp_path / "site"))
    monkeypatch.setenv("PATH", f"{DOUBLE_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    monkeypatch.setenv("CVMFS_SERVER_DOUBLE_ROOT", str(double.root))
    try:
        yield double
    finally:
        double.destroy()
