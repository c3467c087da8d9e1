"""The ingest process: cheroot over TLS (grid proxies allowed), plus an optional plain listener.

Each listener is a cheroot WSGI server whose connection manager is our front stage
(:mod:`ingest.frontstage`): TLS handshakes and request heads are done there without a worker
thread, under the time and count limits of ``[ingest]``. The builtin TLS adapter is extended
to expose the verified client chain as ``SSL_CLIENT_CERT_CHAIN_<n>`` (leaf first; cheroot
gives the application only the leaf) and to wrap without handshaking (the front stage
handshakes without blocking). The SSL context is rebuilt every ``context_reload_seconds``: a
running context never sees a CRL updated on disk. ``run_ingest`` is the entry point of
``userpub ingest``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cheroot import errors as cheroot_errors
from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.app import make_app, make_plain_app, with_apache_paths
from ingest.auth import CHAIN_PREFIX, Authenticator, GridMap
from ingest.connection import connection_class
from ingest.frontslot import EVENTS, DoorLimits
from ingest.frontstage import FrontStage
from ingest.readiness import Readiness
from ingest.stratum0 import with_stratum0
from metrics import IngestMetrics
from publisher.repositories.catalog import Catalog
from spool import Spool
from userpub.checks import bind_problem, port_conflicts
from userpub.config import Config, IngestConfig, split_address
from userpub.daemon import Waker
from userpub.errors import ServiceError

__all__ = ["Bound", "GatedServer", "GridSSLAdapter", "IngestError", "IngestServer",
           "build_context", "raise_file_limit", "run_ingest", "startup_problems",
           "verified_chain", "write_ready_file"]

log = logging.getLogger("userpub.ingest")

PLAIN_MAX_BODY = 64 * 1024
PLAIN_THREADS = 4
MAX_HEADER_BYTES = 64 * 1024
SPARE_FILES = 256  # descriptors besides connections: spool files, logs, libraries, ...



class IngestError(ServiceError):
    """The ingest cannot start with this setup (certificates, ports, spool, grid-mapfile)."""


# -- TLS --------------------------------------------------------------------------------------


def build_context(cfg: IngestConfig) -> ssl.SSLContext:
    """The server SSL context: TLS >= 1.2, no renegotiation, optional client certs, proxies."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets: a session restored from a ticket has lost the client's chain (only
    # the leaf is serialized), hence the identity behind a proxy. Without tickets TLS 1.3 does
    # not resume; TLS 1.2 resumes from the in-memory cache, which keeps the chain.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    # A client that stops mid-body without close_notify gets "body shorter than
    # Content-Length" (the API detects truncation itself) instead of a dead connection.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        ctx.load_cert_chain(str(cfg.certificate), str(cfg.key))
    except OSError as err:  # FileNotFoundError, PermissionError, ssl.SSLError
        reason = re.sub(r"^\[[^]]*\] | \(_ssl\.c:\d+\)$", "", err.strerror or str(err))
        raise IngestError(f"cannot load host certificate {cfg.certificate} with key {cfg.key}: "
                    f"{reason}") from None
    if not cfg.ca_dir.is_dir():
        raise IngestError(f"ca_dir {cfg.ca_dir}: not a directory")
    ctx.load_verify_locations(capath=str(cfg.ca_dir))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    if cfg.crl_check:
        if not any(cfg.ca_dir.glob("*.r[0-9]")):
            raise IngestError(f"crl_check is on but {cfg.ca_dir} holds no CRL (<hash>.r0)")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    return ctx


def _chain(sock: ssl.SSLSocket, which: str) -> list[bytes]:
    public = getattr(sock, which, None)
    if public is not None:  # Python >= 3.13
        return [bytes(c) for c in public() or ()]
    private = getattr(getattr(sock, "_sslobj"), which)()  # noqa: B009 (3.10-3.12, private)
    der = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009
    return [c.public_bytes(der) for c in private or ()]


def verified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """DER certificates of the client's chain, leaf first ([] without a client certificate).

    After a full handshake: the chain OpenSSL verified. A resumed (TLS 1.2 session-ID)
    session has none; its chain was verified when the session was made and is kept with it
    in the server's session cache, so that one is used.
    """
    chain = _chain(sock, "get_verified_chain")
    if not chain and sock.session_reused:
        chain = _chain(sock, "get_unverified_chain")
    return chain


class GridSSLAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter, exposing the verified chain; the front stage handshakes."""

    def __init__(self, cfg: IngestConfig) -> None:
        context = build_context(cfg)
        super().__init__(str(cfg.certificate), str(cfg.key))
        self.context = context

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, Any]]:
        """Wrap without handshaking: the front stage does that, without blocking."""
        try:
            return self.context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False), {}
        except OSError as err:
            raise cheroot_errors.FatalSSLAlert(*err.args) from err

    def get_environ(self, sock: ssl.SSLSocket) -> dict[str, Any]:  # type: ignore[override]
        """cheroot's TLS variables plus ``SSL_CLIENT_CERT_CHAIN_<n>`` (PEM, leaf first)."""
        env: dict[str, Any] = super().get_environ(sock)  # type: ignore[no-untyped-call]
        for n, der in enumerate(verified_chain(sock)):
            env[f"{CHAIN_PREFIX}{n}"] = ssl.DER_cert_to_PEM_cert(der)
        return env


# -- the process ------------------------------------------------------------------------------


class GatedServer(wsgi.Server):
    """cheroot's WSGI server with :class:`FrontStage` as its connection manager."""

    limits: DoorLimits
    on_handshake_failure: Any = None
    front: FrontStage | None = None

    def prepare(self) -> None:
        """Bind and listen (cheroot), then put the front stage in place of its manager."""
        super().prepare()
        manager: Any = self._connections
        manager.close()  # cheroot's: it only watched the listening socket
        self.front = FrontStage(self, self.limits, self.ssl_adapter, self.on_handshake_failure)
        self._connections: Any = self.front


class FrontDoorCollector(Collector):
    """``userpub_connections{listener,state}`` and ``userpub_front_door_events_total``."""

    def __init__(self, servers: list[tuple[str, GatedServer]]) -> None:
        self.servers = servers

    def collect(self) -> list[Metric]:
        """The current values (read without locking: a scrape may be a moment stale)."""
        connections = GaugeMetricFamily(
            "userpub_connections", "Open connections by listener: held by the front stage "
            "(handshake, head, idle, lingering) or given to a worker (queued or served).",
            labels=["listener", "state"])
        events = CounterMetricFamily(
            "userpub_front_door_events", "Connections refused, evicted or timed out by the "
            "front stage, by listener and event.", labels=["listener", "event"])
        for label, srv in self.servers:
            stage = srv.front
            if stage is None:
                continue
            held, total = stage.held, stage.open_connections
            connections.add_metric([label, "front"], held)
            connections.add_metric([label, "worker"], max(0, total - held))
            totals = dict(stage.totals)
            for event in EVENTS:
                events.add_metric([label, event], totals.get(event, 0))
        return [connections, events]


def files_needed(cfg: IngestConfig) -> int:
    """Open files the ingest may need: every listener's connections, the worker threads'
    files, and spares."""
    listeners = 2 if cfg.http_listen else 1
    threads = cfg.threads + (PLAIN_THREADS if cfg.http_listen else 0)
    return listeners * cfg.max_connections + 4 * threads + SPARE_FILES


def file_limit_problem(needed: int) -> str | None:
    """Why RLIMIT_NOFILE cannot be raised to ``needed`` (its hard limit is lower), or None."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < needed:
        return (f"max_connections needs {needed} open files but the hard limit "
                f"(RLIMIT_NOFILE, systemd LimitNOFILE=) is {hard}: lower max_connections "
                "or raise the limit")
    return None


def raise_file_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``needed``; IngestError if the hard limit is
    lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    problem = file_limit_problem(needed)
    if problem is not None:
        raise IngestError(problem)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return needed
    return soft


@dataclass(frozen=True)
class Bound:
    """The addresses actually listened on (ports resolved when configured as 0)."""

    https: tuple[str, int]
    http: tuple[str, int] | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to the ready file."""
        return {"https": _join(self.https), "http": _join(self.http) if self.http else None,
                "pid": os.getpid()}


def _join(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_bindable(address: tuple[str, int], label: str) -> None:
    """A one-line IngestError if ``address`` cannot be bound (cheroot's own message is long)."""
    problem = bind_problem(_join(address), label)
    if problem is not None:
        raise IngestError(problem)


def startup_problems(config: Config, *, create: bool, bind: bool = True,
                     gridmap: GridMap | None = None) -> list[str]:
    """Why the ingest cannot start (one line each; see :mod:`userpub.checks`): the spool, the
    grid-mapfile, the host certificate and key, the CA directory (and CRLs), the open-file
    limit, ports shared by two daemons and, with ``bind``, ports taken right now. With
    ``create`` the missing spool directories are made, as the ingest does when it starts."""
    cfg = config.ingest
    if cfg is None:
        return [f"{config.path}: no [ingest] section"]
    problems = Spool(config.server.spool).layout_problems(create=create)
    try:
        (gridmap or GridMap(cfg.grid_mapfile)).load()
    except FileNotFoundError:
        pass  # allowed: nobody is authorized by certificate until it exists (a warning)
    except OSError as err:
        problems.append(f"grid-mapfile {cfg.grid_mapfile}: {err.strerror}")
    try:
        build_context(cfg)
    except IngestError as err:
        problems.extend(err.problems)
    if (problem := file_limit_problem(files_needed(cfg))) is not None:
        problems.append(problem)
    problems += port_conflicts(config)
    if bind:
        addresses = [("https", cfg.listen)] + ([("http", cfg.http_listen)]
                                               if cfg.http_listen else [])
        found = (bind_problem(address, label) for label, address in addresses)
        problems += [p for p in found if p is not None]
    return problems


class IngestServer:
    """The HTTPS API server and the optional plain-HTTP one, started and stopped together."""

    def __init__(self, config: Config, registry: CollectorRegistry, *,
                 metrics: IngestMetrics | None = None,
                 authenticator: Authenticator | None = None) -> None:
        if config.ingest is None:
            raise IngestError(f"{config.path}: no [ingest] section")
        self.config = config
        self.cfg: IngestConfig = config.ingest
        self.registry = registry
        self.metrics = metrics or IngestMetrics(registry)
        self.authenticator = authenticator or Authenticator.from_config(self.cfg)
        self.servers: list[tuple[str, GatedServer]] = []
        self.threads: list[threading.Thread] = []
        self.failure: BaseException | None = None
        self.adapter: GridSSLAdapter | None = None
        self.readiness: Readiness | None = None
        self.collector: FrontDoorCollector | None = None

    def _server(self, address: tuple[str, int], app: Any, threads: int, body_limit: int
                ) -> GatedServer:
        cfg = self.cfg
        timeout = max(1, round(cfg.socket_timeout))
        srv = GatedServer(address, app, numthreads=threads, timeout=timeout,
                          shutdown_timeout=timeout, request_queue_size=1024,
                          server_name="userpub")
        srv.limits = DoorLimits(
            handshake_timeout=cfg.handshake_timeout, header_timeout=cfg.header_timeout,
            idle_timeout=cfg.idle_timeout, body_timeout=cfg.socket_timeout,
            max_connections=cfg.max_connections,
            max_per_client=cfg.max_connections_per_client, max_head=MAX_HEADER_BYTES)
        srv.on_handshake_failure = self._handshake_failed
        srv.ConnectionClass = connection_class(body_limit)
        srv.max_request_header_size = MAX_HEADER_BYTES
        # 0: cheroot must not answer 413 itself (no log line, no metrics); the app checks
        # Content-Length and the connection classes bound chunked and unread bodies.
        srv.max_request_body_size = 0
        return srv

    def _handshake_failed(self, client: str, reason: str, bad_certificate: bool) -> None:
        if bad_certificate:
            self.metrics.auth_failures.labels("bad_certificate").inc()

    def start(self) -> Bound:
        """Check everything, bind, and serve in background threads; IngestError (every problem,
        one line each) if it cannot."""
        problems = startup_problems(self.config, create=True, bind=False,
                                    gridmap=self.authenticator.gridmap)
        if problems:
            raise IngestError(*problems)
        spool = Spool(self.config.server.spool)
        try:
            entries = self.authenticator.gridmap.load()
            log.info("grid-mapfile %s: %d entries", self.cfg.grid_mapfile, entries)
        except FileNotFoundError:
            log.warning("grid-mapfile %s not found: no certificate is authorized until it "
                        "exists", self.cfg.grid_mapfile)
        except OSError as err:
            raise IngestError(f"grid-mapfile {self.cfg.grid_mapfile}: {err.strerror}") from None
        self.adapter = GridSSLAdapter(self.cfg)
        catalog = Catalog.from_config(self.config)
        self.readiness = Readiness(self.config, spool)
        app = with_apache_paths(make_app(self.config, spool, catalog, self.metrics,
                                         self.authenticator, self.readiness))
        https = self._server(split_address(self.cfg.listen), app, self.cfg.threads,
                             self.cfg.max_upload_bytes)
        https.ssl_adapter = self.adapter
        self.servers.append(("https", https))
        if self.cfg.http_listen:
            # ping, config and /metrics; and the cvmfs-native repositories hosted here
            plain_app = with_apache_paths(with_stratum0(
                make_plain_app(self.config, self.metrics, self.registry, self.readiness),
                self.config))
            plain = self._server(split_address(self.cfg.http_listen), plain_app,
                                 PLAIN_THREADS, PLAIN_MAX_BODY)
            self.servers.append(("http", plain))
        files = raise_file_limit(files_needed(self.cfg))
        try:
            for label, srv in self.servers:
                _check_bindable(srv.bind_addr, label)
                try:
                    srv.prepare()
                except OSError as err:
                    raise IngestError(f"cannot listen on {label} {_join(srv.bind_addr)}: "
                                f"{_last_error(str(err))}") from None
        except BaseException:
            self.stop()
            raise
        self.collector = FrontDoorCollector(list(self.servers))
        self.registry.register(self.collector)
        for label, srv in self.servers:
            thread = threading.Thread(target=self._serve, args=(srv,), name=f"ingest-{label}")
            thread.start()
            self.threads.append(thread)
        for _, srv in self.servers:  # serving (and cheroot's helper thread started)
            if srv.front is not None and not srv.front.running.wait(30):
                raise RuntimeError("a listener did not start serving")
        bound = Bound(self.servers[0][1].bind_addr,
                      self.servers[1][1].bind_addr if len(self.servers) > 1 else None)
        log.info("listening on https://%s%s", _join(bound.https),
                 f" and http://{_join(bound.http)}" if bound.http else "")
        cfg = self.cfg
        log.info("threads %d, connections at most %d (%s per client, open files %d), "
                 "max upload %d bytes, spool reserve %d bytes, limited proxies %s, "
                 "CRL check %s, TLS context rebuilt every %.0f s, token issuers: %s",
                 cfg.threads, cfg.max_connections, cfg.max_connections_per_client or "no limit",
                 files, cfg.max_upload_bytes, cfg.spool_reserve_bytes,
                 "accepted" if cfg.allow_limited_proxies else "refused",
                 "on" if cfg.crl_check else "off", cfg.context_reload_seconds,
                 ", ".join(cfg.token_issuers) or "none")
        return bound

    def _serve(self, srv: GatedServer) -> None:
        try:
            srv.serve()
        except BaseException as err:  # a dead listener must take the process down
            self.failure = err
            log.exception("listener failed")

    def check(self) -> None:
        """Raise if a listener died."""
        if self.failure is not None:
            raise RuntimeError(f"listener failed: {self.failure!r}")

    def reload_tls(self) -> None:
        """Rebuild the SSL context (new CRLs, renewed host certificate) for new connections."""
        if self.adapter is None:
            return
        try:
            self.adapter.context = build_context(self.cfg)
        except IngestError as err:
            log.error("keeping the previous TLS context: %s", err)
            return
        log.info("TLS context reloaded")

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to socket_timeout), join threads."""
        if self.readiness is not None:
            self.readiness.stop()  # a ping in flight answers "not running" from now on
        for _, srv in reversed(self.servers):
            if srv.ready:
                srv.stop()
        for thread in self.threads:
            thread.join()
        if self.collector is not None:
            self.registry.unregister(self.collector)
            self.collector = None
        self.servers.clear()
        self.threads.clear()

    def __enter__(self) -> IngestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _last_error(message: str) -> str:
    found = re.findall(r"\[Errno \d+\] ([^)]+)", message)
    return found[-1] if found else message


def write_ready_file(path: Path, bound: Bound) -> None:
    """Atomically write the bound addresses as JSON (for tests and supervisors)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(bound.as_dict()) + "\n")
    os.replace(tmp, path)


def run_ingest(config: Config, waker: Waker, registry: CollectorRegistry, *,
               ready_file: Path | None = None) -> None:
    """Serve the API until ``waker`` is stopped; IngestError (one line) on startup problems.

    On stop, the listeners close at once and requests in flight get up to ``socket_timeout``
    seconds to finish. ``ready_file`` receives ``{"https": "host:port", "http": ..., "pid":
    ...}`` once both listeners accept connections.
    """
    server = IngestServer(config, registry)
    bound = server.start()
    try:
        if ready_file is not None:
            write_ready_file(ready_file, bound)
        period = server.cfg.context_reload_seconds
        next_reload = time.monotonic() + period
        while not waker.stopped:
            waker.wait(max(0.0, min(1.0, next_reload - time.monotonic())))
            server.check()
            if time.monotonic() >= next_reload:
                server.reload_tls()
                next_reload = time.monotonic() + period
        log.info("stopping: no new connections; finishing requests in flight")
    finally:
        server.stop()
    log.info("stopped")
