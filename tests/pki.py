"""Test wrappers for ingest: a PKI from ``devsite.pki``, configurations, running servers.

* :class:`TestPKI` -- a trusted CA (grid layout, CRL), an untrusted one, host and user
  credentials and every kind of proxy, written to files the way clients use them.
* :func:`ingest_config` -- a site configuration with an ``[ingest]`` section.
* :func:`running_ingest` -- the real ``IngestServer`` (cheroot, TLS) in this process.
* :class:`IngestProcess` -- ``userpub ingest --ready-file`` in a subprocess (the memory test,
  the full flow).
* :class:`TokenIssuerServer` -- OpenID discovery and JWKS over HTTPS on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from devsite.pki import (
    CertificateAuthority,
    Credential,
    TokenIssuer,
    expired_proxy,
    forged_proxy,
    make_proxy,
)
from ingest.server import Bound, IngestServer
from tests.helpers import REPO_ROOT, userpub_cmd, wait_for, write_config
from userpub.config import Config, load_config

USER_DN = "/DC=org/DC=example/OU=People/CN=Jane Doe 12345"
STRANGER_DN = "/DC=org/DC=example/OU=People/CN=John Stranger"


class TestPKI:
    """Every credential the ingest tests need, as files under ``directory``."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority()
        self.ca_dir = directory / "certificates"
        self.ca.install(self.ca_dir)
        self.ca.write_crl(self.ca_dir)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca.pem())
        host = self.ca.issue_host(["localhost", "127.0.0.1"])
        self.host_cert, self.host_key = host.write_pair(directory / "hostcert.pem",
                                                        directory / "hostkey.pem")
        self.user = self.ca.issue_user(USER_DN)
        self.stranger = self.ca.issue_user(STRANGER_DN)
        self.gridmap = directory / "grid-mapfile"
        self.gridmap.write_text(f'# test grid-mapfile\n"{USER_DN}" janedoe\n')
        self.files: dict[str, Path] = {}
        proxy = make_proxy(self.user)
        untrusted_ca = CertificateAuthority("/DC=org/DC=evil/CN=Untrusted CA")
        creds: dict[str, Credential] = {
            "usercert": self.user,
            "proxy": proxy,
            "proxy2": make_proxy(proxy),
            "limited": make_proxy(self.user, limited=True),
            "limited_child": make_proxy(make_proxy(self.user, limited=True)),
            "expired": expired_proxy(self.user),
            "forged": forged_proxy(self.user),
            "stranger": make_proxy(self.stranger),
            "untrusted": make_proxy(untrusted_ca.issue_user(USER_DN)),
        }
        for name, cred in creds.items():
            self.files[name] = cred.write(directory / f"{name}.pem")

    def __getitem__(self, name: str) -> Path:
        return self.files[name]

    def cert(self, name: str) -> tuple[str, str]:
        """``cert=`` for requests: the proxy file twice, as jobsub_lite passes it."""
        return str(self.files[name]), str(self.files[name])


def _toml(value: object) -> str:
    """A TOML value (JSON's syntax, but for tables)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def ingest_config(directory: Path, pki: TestPKI, *, http: bool = True, repos: int = 2,
                  **ingest: object) -> Config:
    """A site under ``directory`` with an ``[ingest]`` section on ephemeral ports."""
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "certificate": str(pki.host_cert), "key": str(pki.host_key),
        "ca_dir": str(pki.ca_dir), "grid_mapfile": str(pki.gridmap),
        "spool_reserve_bytes": 0, "threads": 8, "socket_timeout": 10.0,
    }
    if http:
        values["http_listen"] = "127.0.0.1:0"
    values.update(ingest)
    lines = ["[ingest]"] + [f"{key} = {_toml(value)}" for key, value in values.items()]
    path = write_config(directory, repos, extra="\n".join(lines) + "\n")
    return load_config(path)


@contextlib.contextmanager
def running_ingest(config: Config, registry: CollectorRegistry | None = None
                   ) -> Iterator[tuple[Bound, IngestServer]]:
    """The real servers of ``config`` in this process, stopped on exit."""
    server = IngestServer(config, registry or CollectorRegistry())
    bound = server.start()
    try:
        yield bound, server
    finally:
        server.stop()


def ingest_argv(config_path: Path, ready_file: Path) -> list[str]:
    """``userpub ingest`` writing its bound addresses to ``ready_file``."""
    return userpub_cmd(config_path, "ingest", "--ready-file", str(ready_file))


class IngestProcess:
    """``userpub ingest`` in a subprocess; ``https``/``http`` are its bound ``host:port``."""

    def __init__(self, config: Config, log: Path, timeout: float = 30) -> None:
        self.ready_file = log.with_suffix(".ready")
        self.ready_file.unlink(missing_ok=True)
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(ingest_argv(config.path, self.ready_file),
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        wait_for(lambda: self.ready_file.exists() or self.proc.poll() is not None, timeout,
                 lambda: f"ingest not ready\n{self.log()}")
        if not self.ready_file.exists():
            raise AssertionError(f"ingest exited with {self.proc.returncode}\n{self.log()}")
        ready = json.loads(self.ready_file.read_text())
        self.https: str = ready["https"]
        self.http: str | None = ready["http"]
        self.pid: int = ready["pid"]

    def log(self) -> str:
        """Everything the process logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code


class TokenIssuerServer:
    """An issuer's discovery document and JWKS over HTTPS on 127.0.0.1; logs every request.

    Clients must trust ``pki.ca_file`` (``SSL_CERT_FILE``). Issuer URLs are
    ``https://127.0.0.1:<port>/<name>``.
    """

    def __init__(self, pki: TestPKI) -> None:
        self.requests: list[str] = []
        self.issuers: dict[str, TokenIssuer] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = outer._answer(self.path)
                self.send_response(200 if body is not None else 404)
                data = json.dumps(body or {}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.host_cert, pki.host_key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.base = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def issuer(self, name: str) -> TokenIssuer:
        """A new issuer served at ``<base>/<name>``."""
        self.issuers[name] = TokenIssuer(f"{self.base}/{name}")
        return self.issuers[name]

    def _answer(self, path: str) -> dict[str, object] | None:
        name, _, rest = path.strip("/").partition("/")
        issuer = self.issuers.get(name)
        if issuer is None:
            return None
        if rest == ".well-known/openid-configuration":
            return issuer.discovery(f"{self.base}/{name}/jwks")
        if rest == "jwks":
            return issuer.jwks()
        return None

    def __enter__(self) -> TokenIssuerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
