"""``userpub init DIR``: a working example configuration for trying cvmfs-userpub on this host.

Everything it writes is for trying things out, not for production.
"""

from __future__ import annotations

import socket
from pathlib import Path

EXAMPLE_REPOSITORIES = ("user1.example.org", "user2.example.org")


def example_config_text(directory: Path, server: str, extra: str = "") -> str:
    """The TOML of the example configuration for ``directory`` (paths relative to the file)."""
    repos = "".join(f"""
[[repository]]
name = "{name}"
host = "{server}"
backend = "local"
root = "repos/{name}"
# Worker nodes would read /cvmfs/{name}; here the tree is read where it is written.
mount = "{directory.resolve() / 'repos' / name}"
""" for name in EXAMPLE_REPOSITORIES)
    return f"""# cvmfs-userpub example configuration, written by `userpub init`.
# FOR TRYING THINGS OUT ONLY: development certificates, local repositories.
[server]
name = "{server}"
spool = "spool"
state = "state"
prefix = "sw"

[publisher]
rescan_seconds = 5.0

[janitor]
start_hour = 3
max_days = 30
failed_days = 14
{extra}{repos}"""


def write_example_config(directory: Path, extra: str = "", server: str | None = None) -> Path:
    """Write ``DIR/userpub.toml`` unless one exists; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "userpub.toml"
    if not path.exists():
        name = server or socket.gethostname().split(".")[0] or "pub1"
        path.write_text(example_config_text(directory, name, extra))
    return path
