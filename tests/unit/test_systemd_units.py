"""The systemd units may write where the configuration's defaults put things, and the
operations guide shows the drop-in for other places."""

from __future__ import annotations

from pathlib import Path

import pytest

from userpub.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SPOOL, STATE = str(ServerConfig("x").spool), str(ServerConfig("x").state)
# what each unit's daemons write: the spool always, the state where locks are taken
WRITES = {
    "userpub-ingest.service": {SPOOL},
    "userpub-publisher@.service": {SPOOL, STATE},
    "userpub-janitor.service": {SPOOL, STATE},
    "userpub.service": {SPOOL, STATE},
}


def service_values(path: Path, key: str) -> list[str]:
    """Every value of ``key`` in the [Service] section (systemd lets a key repeat)."""
    values, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.partition("=")[0].strip() == key:
            values.extend(line.partition("=")[2].split())
    return values


def test_the_defaults_are_absolute_system_paths():
    assert SPOOL == "/var/spool/userpub"
    assert STATE == "/var/lib/userpub"


@pytest.mark.parametrize("unit", sorted(WRITES))
def test_units_may_write_the_default_spool_and_state(unit):
    path = UNITS / unit
    assert service_values(path, "ProtectSystem") == ["strict"], unit
    writable = {p.lstrip("-") for p in service_values(path, "ReadWritePaths")}
    assert WRITES[unit] <= writable, (unit, writable)


def test_per_daemon_units_leave_their_checks_to_the_daemon():
    """check-config checks every daemon of the host: the publisher's unit must not refuse to
    start because the ingest's certificate is missing. Each daemon runs its own checks."""
    for unit in ("userpub-ingest.service", "userpub-publisher@.service",
                 "userpub-janitor.service"):
        assert service_values(UNITS / unit, "ExecStartPre") == [], unit
    assert "check-config" in service_values(UNITS / "userpub.service", "ExecStartPre")


def test_the_drop_in_example_for_other_paths():
    example = UNITS / "paths.conf.example"
    assert service_values(example, "ReadWritePaths")
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "systemd/paths.conf.example" in operations
    assert "userpub-publisher@.service.d/paths.conf" in operations
