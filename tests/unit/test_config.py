from pathlib import Path

import pytest

from tests.helpers import run_userpub, write_config
from userpub.config import ConfigError, load_config, parse_config, resolve_config_path

BASE = {"server": {"name": "pub1"},
        "repository": [{"name": "r1.example.org", "host": "pub1", "root": "r1"}]}


def with_(**sections):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in sections.items():
        data[key] = value
    return data


def test_minimal_config_defaults_and_relative_paths(tmp_path):
    cfg = parse_config(with_(), tmp_path / "userpub.toml")
    assert cfg.server.spool == Path("/var/spool/userpub")
    assert cfg.server.state == Path("/var/lib/userpub")
    assert cfg.repositories[0].create is False
    assert cfg.repositories[0].root == (tmp_path / "r1").resolve()
    assert cfg.repositories[0].mount == "/cvmfs/r1.example.org"
    assert cfg.publisher.max_members == 1_000_000
    assert cfg.publisher.max_unpacked_bytes == 16 * 1024**3
    assert cfg.janitor.start_hour == 3 and cfg.janitor.max_days == 30
    assert [r.name for r in cfg.hosted] == ["r1.example.org"]
    assert cfg.ingest is None


CASES = [
    ("unknown key", with_(server={"name": "pub1", "spoool": "x"}), "server: unknown key 'spoool'"),
    ("unknown section", with_(extra={}), "unknown section [extra]"),
    ("no repository", with_(repository=[]), "at least one [[repository]]"),
    ("bad backend", with_(repository=[{"name": "r", "host": "h", "backend": "s3"}]),
     "repository[1].backend: 's3' is not one of"),
    ("missing root", with_(repository=[{"name": "r", "host": "h"}]),
     "repository[1].root: required by the local backend"),
    ("missing name", with_(repository=[{"host": "h", "root": "x"}]),
     "repository[1].name: missing (required)"),
    ("wrong type", with_(publisher={"batch_max_entries": "ten"}),
     "publisher.batch_max_entries: expected an integer"),
    ("bool for int", with_(publisher={"batch_max_entries": True}),
     "publisher.batch_max_entries: expected an integer, got a boolean"),
    ("range", with_(janitor={"start_hour": 24}), "janitor.start_hour: must be at least 0 and at most 23"),
    ("duplicate repo", with_(repository=[{"name": "r", "host": "h", "root": "a"},
                                         {"name": "r", "host": "h", "root": "b"}]),
     "repository 'r' is configured twice"),
    ("shared root", with_(repository=[{"name": "a", "host": "h", "root": "x"},
                                      {"name": "b", "host": "h", "root": "x"}]),
     "two repositories share one root"),
    ("bad address", with_(ingest={"listen": "nowhere"}), "ingest.listen: 'nowhere' is not host:port"),
    ("issuer not https", with_(ingest={"token_issuers": ["http://x"]}), "is not an https:// URL"),
    ("handshake timeout", with_(ingest={"handshake_timeout": 0.5}),
     "ingest.handshake_timeout: must be at least 1.0"),
    ("header timeout type", with_(ingest={"header_timeout": "10"}),
     "ingest.header_timeout: expected a number"),
    ("too few connections", with_(ingest={"max_connections": 8}),
     "ingest.max_connections: must be at least 16"),
    ("connections below threads", with_(ingest={"max_connections": 100, "threads": 200}),
     "ingest.max_connections: must be at least threads (200)"),
    ("per client over the total", with_(ingest={"max_connections": 100,
                                                "max_connections_per_client": 101}),
     "ingest.max_connections_per_client: must be at most max_connections (100)"),
    ("negative per client", with_(ingest={"max_connections_per_client": -1}),
     "ingest.max_connections_per_client: must be at least 0"),
    ("prefix clash", with_(server={"name": "pub1", "prefix": "ts"}), "prefix and stamps must differ"),
    ("bad prefix", with_(server={"name": "pub1", "prefix": "a/b"}), "server.prefix"),
    ("relative mount", with_(repository=[{"name": "r", "host": "h", "root": "x", "mount": "cvmfs/r"}]),
     "repository[1].mount: 'cvmfs/r' must be an absolute path"),
    ("origin not a URL", with_(repository=[{"name": "r", "host": "h", "root": "x", "replica": "y",
                                            "origin": "pub2:80/cvmfs/r"}]),
     "repository[1].origin: 'pub2:80/cvmfs/r' is not an http:// or https:// URL"),
    ("origin without replica", with_(repository=[{"name": "r", "host": "h", "root": "x",
                                                  "origin": "http://pub2/cvmfs/r"}]),
     "repository[1].origin: only for a repository with a replica"),
    ("master key without replica", with_(repository=[{"name": "r", "host": "h", "root": "x",
                                                      "master_key": "r.pub"}]),
     "repository[1].master_key: only for a repository with a replica"),
    ("replica interval", with_(server={"name": "pub1", "replica_interval": 0.5}),
     "server.replica_interval: must be at least 1.0"),
]


@pytest.mark.parametrize(("case", "data", "problem"), CASES, ids=[c[0] for c in CASES])
def test_each_problem_is_one_clear_line(tmp_path, case, data, problem):
    with pytest.raises(ConfigError) as err:
        parse_config(data, tmp_path / "userpub.toml")
    assert any(problem in p for p in err.value.problems), err.value.problems
    assert all("\n" not in p for p in err.value.problems)


def test_all_problems_reported_at_once(tmp_path):
    data = with_(publisher={"batch_max_entries": 0, "observer": "magic"}, janitor={"max_days": -1})
    with pytest.raises(ConfigError) as err:
        parse_config(data, tmp_path / "userpub.toml")
    assert len(err.value.problems) == 3


def test_config_path_resolution(tmp_path):
    assert resolve_config_path("x.toml", {}).name == "x.toml"
    assert resolve_config_path(None, {"USERPUB_CONFIG": "/a/b.toml"}).as_posix() == "/a/b.toml"
    assert resolve_config_path(None, {}).as_posix() == "/etc/userpub/userpub.toml"


def test_cli_prints_fatal_lines_and_exits_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nname = "pub1"\nbogus = 1\n[[repository]]\nname = "r"\nhost = "pub1"\n')
    result = run_userpub(bad, "check-config", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["fatal: server: unknown key 'bogus'",
                     "fatal: repository[1].root: required by the local backend"]


def test_cli_missing_file_and_invalid_toml(tmp_path):
    result = run_userpub(tmp_path / "none.toml", "check-config", check=False)
    assert result.returncode == 1 and result.stderr.startswith("fatal: configuration file")
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    result = run_userpub(broken, "check-config", check=False)
    assert result.returncode == 1 and "invalid TOML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_valid_config(tmp_path):
    path = write_config(tmp_path)
    result = run_userpub(path, "check-config")
    assert "is valid" in result.stdout
    assert load_config(path).server.name == "pub1"
