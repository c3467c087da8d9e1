"""The publication API as Bottle apps; answers byte for byte as the original cvmfs-user-pub.

Routes (HTTPS): ``POST /pubapi/publish?cid=``, ``GET /pubapi/exists|update|status?cid=``,
``GET /pubapi/config`` and ``GET /pubapi/ping``; the handlers are :mod:`ingest.handlers`,
one function each. The plain-HTTP app serves only ``ping``, ``config`` and ``/metrics``.
Every request gets one log line and its metrics, whatever its outcome.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import bottle
from prometheus_client import CollectorRegistry

from ingest import handlers, peer_handlers
from ingest.auth import Authenticator
from ingest.handlers import Api, StampLimiter
from ingest.readiness import Readiness
from ingest.responses import CID, IDENTITY, RECEIVED, ROUTE, TEXT_HEADERS, reply
from metrics import IngestMetrics
from publisher.repositories.catalog import Catalog
from spool import Spool
from userpub.config import Config
from userpub.peers import PeerClient

__all__ = ["ApiApp", "make_app", "make_plain_app", "with_apache_paths"]

log = logging.getLogger("userpub.ingest.access")

StartResponse = Callable[..., Any]
Handler = Callable[[dict[str, Any]], bottle.HTTPResponse]
_SLASHES = re.compile("/{2,}")

class ApiApp(bottle.Bottle):  # type: ignore[misc]
    """Bottle with an access-log line and metrics per request, and plain-text errors."""

    def __init__(self, metrics: IngestMetrics) -> None:
        super().__init__(catchall=True)
        self.metrics = metrics

    def default_error_handler(self, res: bottle.HTTPError) -> str:
        """404 and 405 from the router (and 500s) in the original's plain-text style."""
        for key, value in TEXT_HEADERS.items():
            bottle.response.set_header(key, value)
        if res.status_code == 404:
            bottle.response.status = "404 Not found"
            return "Unrecognized api\n"
        if res.status_code == 405:
            return "Method not allowed\n"
        return f"{res.status_line[4:]}\n"

    def wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Run the request, then log it and count it."""
        started = time.monotonic()
        environ.setdefault(ROUTE, "unknown")
        seen: list[str] = []

        def recording_start_response(status: str, headers: list[tuple[str, str]],
                                     exc_info: Any = None) -> Any:
            seen.append(status)
            return start_response(status, headers, exc_info)

        try:
            out: Iterable[bytes] = super().wsgi(environ, recording_start_response)
            return out
        finally:
            code = seen[-1].split(" ", 1)[0] if seen else "500"
            elapsed = time.monotonic() - started
            route = str(environ[ROUTE])
            self.metrics.requests.labels(route, code).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            log.info("%s identity=%s route=%s cid=%s status=%s bytes=%d duration=%.3f",
                     environ.get("REMOTE_ADDR", "-"), json.dumps(environ.get(IDENTITY, "-")),
                     route, json.dumps(environ.get(CID, "-")), code,
                     environ.get(RECEIVED, 0), elapsed)


def _route(app: ApiApp, path: str, name: str, handler: Handler, method: str = "GET") -> None:
    """Register a handler taking the environ; unexpected errors become a logged 500."""

    def callback() -> bottle.HTTPResponse:
        environ: dict[str, Any] = bottle.request.environ
        environ[ROUTE] = name
        try:
            return handler(environ)
        except bottle.HTTPResponse as response:
            return response
        except Exception:
            log.exception("%s failed", name)
            return reply("500 Internal Server Error", "Internal error\n", close=True)

    app.route(path, method, callback)


def with_apache_paths(app: Any) -> Any:
    """A WSGI wrapper routing paths as Apache serves them: runs of ``/`` merged and a trailing
    ``/`` dropped, so ``//pubapi/x``, ``/pubapi//x`` and ``/pubapi/x/`` reach ``/pubapi/x``."""

    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        merged = _SLASHES.sub("/", path)
        if len(merged) > 1 and merged.endswith("/"):
            merged = merged[:-1]
        if merged != path:
            environ["PATH_INFO"] = merged
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return wrapped


def make_app(config: Config, spool: Spool, catalog: Catalog, metrics: IngestMetrics,
             authenticator: Authenticator, readiness: Readiness,
             stamps: StampLimiter | None = None) -> bottle.Bottle:
    """The HTTPS API; ``stamps`` limits the stamps of ``exists`` (default: the configured
    interval)."""
    if config.ingest is None:
        raise ValueError("the configuration has no [ingest] section")
    cfg = config.ingest
    peers = PeerClient.from_config(config)
    api = Api(config, cfg, spool, catalog, metrics, authenticator,
              catalog.only([r.name for r in config.hosted]),
              stamps or StampLimiter(cfg.stamp_on_exists_seconds), peers,
              ready=readiness.problem)
    app = ApiApp(metrics)
    _route(app, "/pubapi/ping", "ping", partial(handlers.ping, readiness))
    _route(app, "/pubapi/config", "config", lambda environ: handlers.config_answer(config))
    _route(app, "/pubapi/exists", "exists", partial(handlers.exists, api))
    _route(app, "/pubapi/update", "update", partial(handlers.update, api))
    _route(app, "/pubapi/status", "status", partial(handlers.status, api))
    _route(app, "/pubapi/publish", "publish", partial(handlers.publish, api), "POST")
    _route(app, "/pubapi/peer/state", "peer_state", partial(peer_handlers.state, api))
    _route(app, "/pubapi/peer/claim", "peer_claim", partial(peer_handlers.claim, api))
    _route(app, "/pubapi/peer/masterkey", "peer_masterkey",
           partial(peer_handlers.master_key, api))
    _route(app, "/pubapi/peer/lastuse", "peer_lastuse", partial(peer_handlers.last_use, api),
           "POST")
    return app


def make_plain_app(config: Config, metrics: IngestMetrics, registry: CollectorRegistry,
                   readiness: Readiness) -> bottle.Bottle:
    """The plain-HTTP listener: ``/pubapi/ping``, ``/pubapi/config`` and ``/metrics`` only."""
    app = ApiApp(metrics)
    _route(app, "/pubapi/ping", "ping", partial(handlers.ping, readiness))
    _route(app, "/pubapi/config", "config", lambda environ: handlers.config_answer(config))
    _route(app, "/metrics", "metrics", lambda environ: handlers.metrics_answer(registry))
    return app
