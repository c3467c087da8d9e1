"""The import rules of the house (scripts/import_rules.py, run by ``make lint``).

The real tree keeps every rule, and each rule fails the check when a tree breaks it.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "import_rules.py"
_spec = importlib.util.spec_from_file_location("import_rules", SCRIPT)
assert _spec is not None and _spec.loader is not None
rules = importlib.util.module_from_spec(_spec)
sys.modules["import_rules"] = rules
_spec.loader.exec_module(rules)


def test_the_house_keeps_every_rule():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_the_picture_shows_every_room_by_layer():
    picture = subprocess.run([sys.executable, str(SCRIPT), "--graph"], capture_output=True,
                             text=True, check=True).stdout
    for room in ("userpub.cli", "devsite", "publisher", "janitor", "ingest", "spool", "metrics",
                 "publisher.repositories", "publisher.tarball", "userpub_client",
                 "cvmfs_verify"):
        assert f"  {room} " in picture
    assert "publisher.tarball        -> -" in picture  # the tar rules import nothing of ours


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in rules.PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text("")
        path.write_text(text)
    return tmp_path


BROKEN = [
    # rule 1: upwards, and between siblings
    ({"spool/queue.py": "from publisher.daemon import Publisher\n"}, "rule 1: spool (layer 3)"),
    ({"publisher/tarball/unpack.py": "import publisher.repositories.local\n"},
     "rule 1: publisher.tarball"),
    ({"ingest/app.py": "from janitor.cleanup import plan\n"}, "rule 1: ingest and janitor are siblings"),
    ({"metrics/definitions.py": "from spool import Spool\n"}, "rule 1: metrics and spool are siblings"),
    ({"publisher/repositories/local.py": "def f():\n    from publisher import daemon\n"},
     "rule 1: publisher.repositories (layer 3) imports upwards into publisher"),
    ({"userpub/supervisor.py": "from userpub import cli\n"}, "rule 1: userpub.supervisor"),
    # rule 2: the foundation and the client: the standard library only
    ({"userpub/config.py": "import filelock\n"}, "rule 2: the userpub room"),
    ({"userpub/fsutil.py": "from spool.names import encode_name\n"}, "rule 2: the userpub room"),
    ({"userpub_client/api.py": "import requests\n"}, "rule 2: the userpub_client room"),
    ({"userpub_client/cli.py": "from userpub.config import Config\n"},
     "rule 2: the userpub_client room"),
    # rule 3: the auditor
    ({"cvmfs_verify/fetch.py": "import requests\n"}, "rule 3: cvmfs_verify imports the standard"),
    ({"cvmfs_verify/tree.py": "from publisher.repositories.cvmfs_native import catalog\n"},
     "rule 3: cvmfs_verify imports nothing"),
    ({"janitor/cleanup.py": "from cvmfs_verify.verify import verify_repository\n"},
     "rule 3: only the CLI imports cvmfs_verify"),
    # rule 4: the development site
    ({"ingest/server.py": "from devsite.pki import DevCA\n"}, "rule 4"),
    # rule 5: third-party packages in their rooms
    ({"publisher/daemon.py": "import bottle\n"}, "rule 5: bottle belongs in ingest"),
    ({"janitor/daemon.py": "from watchdog.observers import Observer\n"},
     "rule 5: watchdog belongs in publisher"),
    ({"spool/queue.py": "import prometheus_client\n"}, "rule 5: prometheus_client belongs"),
    ({"metrics/exporter.py": "from cheroot import wsgi\n"}, "rule 5: cheroot belongs in ingest"),
]


@pytest.mark.parametrize(("files", "rule"), BROKEN, ids=[r for _, r in BROKEN])
def test_each_rule_fails_when_broken(tmp_path, files, rule):
    root = _tree(tmp_path, files)
    found = [str(v) for v in rules.check(root)]
    assert len(found) == 1, found
    assert rule in found[0], found
    result = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 1
    assert rule in result.stdout


ALLOWED = [
    {"userpub/cli.py": "from devsite.site import write_example_site\n"
                       "from cvmfs_verify.commands import run_verify\nimport prometheus_client\n"},
    {"publisher/daemon.py": "from watchdog.observers import Observer\n"
                            "from publisher.repositories import open_repository\n"
                            "from spool import Spool\nfrom metrics import PublisherMetrics\n"},
    {"ingest/app.py": "import bottle\nfrom userpub_client.cid import validate_cid\n"
                      "from publisher.repositories.catalog import Catalog\n"},
    {"cvmfs_verify/signature.py": "from cryptography import x509\nimport sqlite3\n"},
    {"publisher/repositories/local.py": "from publisher.tarball.unpack import unpack\n"
                                        "from userpub.fsutil import syncfs\nimport filelock\n"},
    {"devsite/site.py": "from devsite.pki import write_dev_site\nimport jwt\n"},
]


@pytest.mark.parametrize("files", ALLOWED)
def test_what_the_rules_allow_passes(tmp_path, files):
    assert rules.check(_tree(tmp_path, files)) == []
