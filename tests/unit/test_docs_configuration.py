"""docs/configuration.md lists every configuration key of the code, with the same default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from userpub import config as cfg
from userpub.pair import PairConfig, PeerConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SECTIONS = {
    "[server]": cfg.ServerConfig,
    "[[repository]]": cfg.RepositoryConfig,
    "[publisher]": cfg.PublisherConfig,
    "[ingest]": cfg.IngestConfig,
    "[janitor]": cfg.JanitorConfig,
    "[metrics]": cfg.MetricsConfig,
    "[pair]": PairConfig,
    "[[peer]]": PeerConfig,
}


def documented() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = {}
        elif current and (m := re.match(r"\|\s*`(\w+)`\s*\|\s*(.*?)\s*\|", line)):
            out[current][m.group(1)] = m.group(2)
    return out


def code_default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_key_documented_with_its_default(section):
    doc = documented()
    assert section in doc, f"docs/configuration.md has no '## {section}' section"
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert set(doc[section]) == set(fields), (set(doc[section]) ^ set(fields))
    for name, text in doc[section].items():
        if text.startswith("`"):
            literal = tomllib.loads(f"v = {text.strip('`')}")["v"]
            assert literal == code_default(fields[name]), (section, name)
        else:
            assert text.startswith("*"), f"{section} {name}: default must be `toml` or *words*"


def test_server_paths_resolve_relative_to_the_file(tmp_path):
    parsed = cfg.parse_config({"server": {"spool": "s"},
                               "repository": [{"name": "r", "host": "h", "root": "x"}]},
                              tmp_path / "c.toml")
    assert parsed.server.spool == (tmp_path / "s").resolve()
    assert parsed.server.state == Path("/var/lib/userpub")  # the default, as the units say
