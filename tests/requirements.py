"""What a test needs from the machine, the one-line skips that say so, and CI's rule.

* :func:`tool` -- a program from a system package (``make system-deps`` installs them all);
  the test skips with "X is not installed (Debian package P: make system-deps)".
* :func:`root` -- the test needs root (mounts, dropping capabilities).
* :func:`machine_skip` -- this machine cannot run the test at all (another architecture, too
  small a disk, no DNS resolver): a skip that is legitimate everywhere, CI included.

``make test`` therefore runs as any user and skips what the machine lacks. CI (``.ci/run``)
installs every package, runs as root and sets ``USERPUB_REQUIRE_ALL=1``: then any skip but a
:func:`machine_skip` fails the test (a tool CI should have installed is missing, a test CI
should run did not), and a module skipped at collection fails the run. The hooks below are
registered by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from typing import NoReturn

import pluggy
import pytest

REQUIRE_ALL = "USERPUB_REQUIRE_ALL"
MACHINE = "this machine cannot run it: "  # the prefix of every legitimate skip


def tool(name: str, package: str | None = None) -> str:
    """The path of the program ``name``, or skip: it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package or name}: "
                    "make system-deps)")
    return path


def root(why: str) -> None:
    """Skip unless running as root (``why``: what the test does that needs it)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def machine_skip(reason: str) -> NoReturn:
    """Skip because this machine cannot run the test at all: legitimate on CI too."""
    pytest.skip(MACHINE + reason)


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class RequireAll:
    """The CI rule (a pytest plugin): every skip but a machine_skip is a failure."""

    def __init__(self) -> None:
        self.skipped_modules: list[str] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
        """A skipped test becomes a failure, with the skip's reason."""
        outcome = yield
        report = outcome.get_result()
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = _reason(report)
            if not reason.startswith(MACHINE):
                report.outcome = "failed"
                report.longrepr = f"skipped, but {REQUIRE_ALL}=1 (CI) runs every test: {reason}"

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module skipped at collection cannot fail there: remember it for the end."""
        if report.skipped and not _reason(report).startswith(MACHINE):
            self.skipped_modules.append(f"{report.nodeid}: {_reason(report)}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Fail the run if a module was skipped at collection."""
        if not self.skipped_modules:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in self.skipped_modules:
            if reporter is not None:
                reporter.write_line(f"skipped at collection, but {REQUIRE_ALL}=1 (CI) runs "
                                    f"every test: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """Register :class:`RequireAll` when ``USERPUB_REQUIRE_ALL`` is set (and not 0)."""
    if os.environ.get(REQUIRE_ALL, "") not in ("", "0"):
        config.pluginmanager.register(RequireAll(), "userpub-require-all")
