"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.helpers import write_config
from tests.requirements import pytest_configure  # noqa: F401 (CI's rule: USERPUB_REQUIRE_ALL)
from userpub.config import Config, load_config


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    """A test must not leave threads behind (watchdog observers, servers...)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()
              and not t.daemon]
    assert not leaked, f"threads leaked: {leaked}"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """A two-repository configuration under tmp_path."""
    return write_config(tmp_path / "site")


@pytest.fixture
def config(config_path: Path) -> Config:
    """The loaded configuration of :func:`config_path`."""
    return load_config(config_path)
