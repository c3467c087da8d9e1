"""``userpub init DIR``: a working example site for trying cvmfs-userpub on this host.

It writes ``DIR/userpub.toml`` (two local repositories hosted here, an HTTPS ingest on free
local ports), development credentials (made by :mod:`devsite.pki`), a sample
tarball, ``DIR/env.sh`` with what a client needs, and ``DIR/QUICKSTART.txt``. Everything it writes
is for trying things out, never for production.
"""

from __future__ import annotations

import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from devsite.pki import write_dev_site
from userpub.errors import ServiceError
from userpub_client.reproducible_tar import make_tarball

EXAMPLE_REPOSITORIES = ("user1.example.org", "user2.example.org")
DEV_ISSUER = "https://localhost/userpub-dev-issuer"


@dataclass(frozen=True)
class Credentials:
    """The development credentials the example configuration points at."""

    ca_dir: Path
    ca_file: Path
    host_cert: Path
    host_key: Path
    grid_mapfile: Path
    proxy: Path
    token_file: Path
    issuer_jwks: Path


@dataclass(frozen=True)
class Ports:
    """Local ports of the example site."""

    https: int
    http: int
    publisher_metrics: int  # and the next one, for the second repository
    janitor_metrics: int


def free_ports() -> Ports:
    """Ports free right now on 127.0.0.1 (the publisher's metrics need two in a row)."""
    def one() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    while True:
        base = one()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return Ports(one(), one(), base, one())


def https_url(ports: Ports) -> str:
    """The example server's URL."""
    return f"https://localhost:{ports.https}"


def example_config_text(directory: Path, server: str, ports: Ports, creds: Credentials) -> str:
    """The TOML of the example configuration for ``directory``."""
    root = directory.resolve()
    repos = "".join(f"""
[[repository]]
name = "{name}"
host = "{server}"
backend = "local"
root = "repos/{name}"
create = true    # the publisher makes the root when missing: for this example only
# Worker nodes would read /cvmfs/{name}; in this example the tree is read where it is written.
mount = "{root / 'repos' / name}"
""" for name in EXAMPLE_REPOSITORIES)
    return f"""# cvmfs-userpub example site, written by `userpub init`.
# FOR TRYING THINGS OUT ONLY: development CA and credentials, local repositories.
[server]
name = "{server}"
spool = "spool"
state = "state"
prefix = "sw"

[publisher]
rescan_seconds = 5.0

[ingest]
listen = "127.0.0.1:{ports.https}"
http_listen = "127.0.0.1:{ports.http}"
certificate = "{creds.host_cert}"
key = "{creds.host_key}"
ca_dir = "{creds.ca_dir}"
grid_mapfile = "{creds.grid_mapfile}"
token_issuers = ["{DEV_ISSUER}"]
token_audiences = ["{https_url(ports)}"]
token_keys = {{ "{DEV_ISSUER}" = "{creds.issuer_jwks}" }}
spool_reserve_bytes = 1073741824
threads = 16

[janitor]
start_hour = 3
max_days = 30
failed_days = 14

[metrics]
publisher_listen = "127.0.0.1:{ports.publisher_metrics}"
janitor_listen = "127.0.0.1:{ports.janitor_metrics}"
{repos}"""


def client_exports(config: Path, ports: Ports, creds: Credentials) -> list[str]:
    """``export NAME=VALUE`` lines for a client on this host."""
    values = {
        "USERPUB_CONFIG": str(config),
        "USERPUB_SERVERS": https_url(ports),
        "X509_USER_PROXY": str(creds.proxy),
        "X509_CERT_DIR": str(creds.ca_dir),
        "BEARER_TOKEN_FILE": str(creds.token_file),
        "USERPUB_CA_BUNDLE": str(creds.ca_file),
        "CURL_CA_BUNDLE": str(creds.ca_file),
        "REQUESTS_CA_BUNDLE": str(creds.ca_file),
        "USERPUB_REPOS": ",".join(EXAMPLE_REPOSITORIES),
    }
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]


def quickstart_text(directory: Path, ports: Ports, sample: Path) -> str:
    """Copy-paste commands to publish the sample tarball with the client and with curl."""
    env = directory.resolve() / "env.sh"
    url = https_url(ports)
    return f"""cvmfs-userpub is starting on {url} (example site in {directory.resolve()}).
In another shell, publish the sample tarball:

  . {env}

  # with the client (the bearer token; add --proxy "$X509_USER_PROXY" to use the proxy):
  .venv/bin/userpub client publish {sample} --group demo

  # with curl and the proxy:
  CID=demo/$(sha256sum < {sample} | cut -c1-64)
  curl -sS --cert "$X509_USER_PROXY" --key "$X509_USER_PROXY" --cacert "$USERPUB_CA_BUNDLE" \\
       -T {sample} -X POST "{url}/pubapi/publish?cid=$CID"
  curl -sS --cert "$X509_USER_PROXY" --key "$X509_USER_PROXY" --cacert "$USERPUB_CA_BUNDLE" \\
       "{url}/pubapi/status?cid=$CID"

  # where a job finds it:
  .venv/bin/userpub wait "$CID" --mount-root {directory.resolve() / 'repos'} --timeout 60
"""


class SiteError(ServiceError):
    """The example site cannot be written (a configuration not written by us is in the way)."""


def write_example_site(directory: Path) -> list[str]:
    """Write the example site into ``directory`` (once); the ``export`` lines a client needs.

    A directory that already holds a site written by this function is left alone and its
    export lines are returned again; any other ``userpub.toml`` there raises SiteError.
    """
    config_path = directory / "userpub.toml"
    env_file = directory / "env.sh"
    if config_path.exists():
        if not env_file.exists():
            raise SiteError(f"{config_path} exists (not written by userpub init); not touching it")
        return [line for line in env_file.read_text().splitlines() if line.startswith("export ")]
    directory.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    site = write_dev_site(directory / "pki", DEV_ISSUER, https_url(ports))
    creds = Credentials(site.pki.ca_dir, site.pki.ca_file, site.pki.host_cert,
                        site.pki.host_key, site.pki.grid_mapfile, site.pki.user_proxy,
                        site.token_file, site.issuer_jwks)
    server = socket.gethostname().split(".")[0] or "pub1"
    config_path.write_text(example_config_text(directory, server, ports, creds))
    sample_dir = directory / "sample" / "demo-code"
    sample_dir.mkdir(parents=True, exist_ok=True)
    (sample_dir / "run.sh").write_text("#!/bin/sh\necho 'hello from cvmfs-userpub'\n")
    (sample_dir / "run.sh").chmod(0o755)
    (sample_dir / "README").write_text("A sample of user code published by cvmfs-userpub.\n")
    sample = directory / "sample.tar.gz"
    make_tarball(sample_dir, sample)
    exports = client_exports(config_path, ports, creds)
    env_file.write_text("# cvmfs-userpub example site: what a client on this host needs\n"
                        + "\n".join(exports) + "\n")
    (directory / "QUICKSTART.txt").write_text(quickstart_text(directory, ports, sample))
    return exports
