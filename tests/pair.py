"""Two complete sites on loopback that form a pair: ``PairSites(directory)``.

Each site has its own spool, state, keys, ports and host certificate (one test CA); site A
(``pubA``) hosts repo1 and repo2, site B (``pubB``) hosts repo3 and repo4, all cvmfs-native,
each with a replica directory of the other site's repositories. Both configurations list both
servers as ``[[peer]]`` (each skips itself), as one shared list would.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from tests.pki import TestPKI
from userpub.config import Config, load_config

NAMES = ("pubA", "pubB")
HOSTED = {"pubA": ("repo1.example.org", "repo2.example.org"),
          "pubB": ("repo3.example.org", "repo4.example.org")}
REPOS = HOSTED["pubA"] + HOSTED["pubB"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Site:
    """One server of the pair."""

    name: str
    directory: Path
    https: int
    http: int
    certificate: Path
    key: Path
    dn: str
    config: Config | None = None

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.https}"

    @property
    def stratum0(self) -> str:
        return f"http://127.0.0.1:{self.http}/cvmfs"

    def root(self, repo: str) -> Path:
        return self.directory / "srv" / repo

    def replica(self, repo: str) -> Path:
        return self.directory / "replicas" / repo


class PairSites:
    """The two sites; write() their configurations once every port is known."""

    def __init__(self, directory: Path, *, extra: dict[str, dict[str, object]] | None = None
                 ) -> None:
        self.pki = TestPKI(directory / "pki")
        self.sites: dict[str, Site] = {}
        for name in NAMES:
            host = self.pki.ca.issue_host([f"{name.lower()}.localhost", "127.0.0.1", "localhost"])
            site_dir = directory / name
            (site_dir / "host").mkdir(parents=True)
            cert, key = host.write_pair(site_dir / "host" / "hostcert.pem",
                                        site_dir / "host" / "hostkey.pem")
            self.sites[name] = Site(name, site_dir, free_port(), free_port(), cert, key,
                                    host.dn)
        self.extra = extra or {}
        for site in self.sites.values():
            site.config = load_config(self._write(site))

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def _write(self, site: Site) -> Path:
        def table(values: dict[str, object]) -> str:
            return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

        ingest = {"listen": f"127.0.0.1:{site.https}", "http_listen": f"127.0.0.1:{site.http}",
                  "certificate": str(site.certificate), "key": str(site.key),
                  "ca_dir": str(self.pki.ca_dir), "grid_mapfile": str(self.pki.gridmap),
                  "spool_reserve_bytes": 0, "threads": 8, "socket_timeout": 10.0,
                  **self.extra.get("ingest", {})}
        server = {"name": site.name, "spool": "spool", "state": "state",
                  **self.extra.get("server", {})}
        text = (f"[server]\n{table(server)}\n"
                '[publisher]\nrescan_seconds = 1.0\ndurable = false\n\n'
                '[metrics]\npublisher_listen = "127.0.0.1:0"\njanitor_listen = "127.0.0.1:0"\n'
                'replicator_listen = "127.0.0.1:0"\n\n'
                f"[ingest]\n{table(ingest)}\n"
                f"[pair]\n{table({'timeout': 5.0, 'cache_seconds': 0.0, **self.extra.get('pair', {})})}\n")
        for peer in self.sites.values():
            text += (f'[[peer]]\nname = "{peer.name}"\nurl = "{peer.base}"\n'
                     f'stratum0 = "{peer.stratum0}"\ndn = "{peer.dn}"\n\n')
        for owner, repos in HOSTED.items():
            for repo in repos:
                where = (f'root = "{site.root(repo)}"\ncreate = true' if owner == site.name
                         else f'replica = "{site.replica(repo)}"')
                text += (f'[[repository]]\nname = "{repo}"\nhost = "{owner}"\n'
                         f'backend = "cvmfs-native"\n{where}\nmount = "/cvmfs/{repo}"\n'
                         f'{table(self.extra.get("repository", {}))}\n')
        path = site.directory / "userpub.toml"
        path.write_text(text)
        return path

    def wipe(self, name: str, repo: str) -> None:
        """Lose a repository of site ``name`` (a reinstalled disk)."""
        shutil.rmtree(self.sites[name].root(repo))
