"""The publication API as Bottle apps; answers byte for byte as the original cvmfs-user-pub.

Routes (HTTPS): ``POST /pubapi/publish?cid=``, ``GET /pubapi/exists|update|status?cid=``,
``GET /pubapi/config`` and ``GET /pubapi/ping``. The plain-HTTP app serves only ``ping``,
``config`` and ``/metrics``. Handlers read ``request.query`` and the raw ``wsgi.input`` only
(bottle's ``request.body`` buffers the body and breaks chunked uploads under cheroot).
Every request gets one log line and its metrics, whatever its outcome.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import bottle
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingest.auth import Authenticator, AuthError, Identity
from ingest.connection import TOO_LARGE
from metrics import IngestMetrics
from publisher.repositories.catalog import Catalog
from spool import DropResult, Spool, State
from userpub.config import Config
from userpub_client.cid import InvalidCid, validate_cid

__all__ = ["ApiApp", "WriteBehind", "bad_request", "make_app", "make_plain_app", "reply"]

log = logging.getLogger("userpub.ingest.access")

CHUNK = 1 << 20
SPACE_CHECK_BYTES = 64 << 20
TEXT_HEADERS = {"Content-Type": "text/plain", "Cache-Control": "max-age=0"}
# Keys of per-request facts kept in the WSGI environ for the access log and the metrics.
ROUTE, IDENTITY, CID, RECEIVED = ("userpub.route", "userpub.identity", "userpub_client.cid",
                                  "userpub.received")

StartResponse = Callable[..., Any]


class WriteBehind:
    """Writes filled buffers in a helper thread while the next one is received.

    Receiving (SSL_read), hashing and writing all release the GIL, so with two buffers they
    overlap on two cores. A write error is raised by the next :meth:`buffer` or by
    :meth:`close`; buffers are written in order.
    """

    def __init__(self, write: Callable[[memoryview], None], size: int) -> None:
        self._write = write
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(2):
            self._free.put(memoryview(bytearray(size)))
        self._full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ingest-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            view, n = item
            if self._error is None:
                try:
                    self._write(view[:n])
                except BaseException as err:  # handed to the receiving thread
                    self._error = err
            self._free.put(view)

    def buffer(self) -> memoryview:
        """A free buffer (waits while both are being written)."""
        view = self._free.get()
        if self._error is not None:
            raise self._error
        return view

    def put(self, view: memoryview, n: int) -> None:
        """Queue the first ``n`` bytes of ``view`` for writing."""
        self._full.put((view, n))

    def close(self) -> None:
        """Wait until everything queued is written; raise the write error, if any."""
        self.abort()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the writer thread (after what is queued); idempotent."""
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()


def reply(status: str, body: str, *, close: bool = False) -> bottle.HTTPResponse:
    """A plain-text response; ``close`` when part of the request body was left unread."""
    headers = dict(TEXT_HEADERS)
    if close:
        headers["Connection"] = "close"
    return bottle.HTTPResponse(body, status, headers)


def bad_request(reason: str, *, close: bool = False) -> bottle.HTTPResponse:
    """The original's ``400 Bad request`` with ``Bad request: <reason>``."""
    return reply("400 Bad request", f"Bad request: {reason}\n", close=close)


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


def _route(app: ApiApp, path: str, name: str, method: str = "GET"
           ) -> Callable[[Callable[[dict[str, Any]], bottle.HTTPResponse]], None]:
    """Register a handler taking the environ; unexpected errors become a logged 500."""

    def register(handler: Callable[[dict[str, Any]], bottle.HTTPResponse]) -> None:
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

    return register


def _config_body(config: Config) -> str:
    return "repos:" + ",".join(r.name for r in config.repositories) + "\n"


def make_app(config: Config, spool: Spool, catalog: Catalog, metrics: IngestMetrics,
             authenticator: Authenticator) -> bottle.Bottle:
    """The HTTPS API."""
    if config.ingest is None:
        raise ValueError("the configuration has no [ingest] section")
    cfg = config.ingest
    app = ApiApp(metrics)

    def authenticate(environ: dict[str, Any]) -> Identity:
        try:
            identity = authenticator.authenticate(environ)
        except AuthError as err:
            metrics.auth_failures.labels(err.reason).inc()
            environ[IDENTITY] = f"refused {err.reason}: {err.subject or '-'}"
            raise reply("403 Access denied", f"{err.message}\n") from None
        environ[IDENTITY] = identity.name
        return identity

    def get_cid(environ: dict[str, Any], route: str) -> str:
        values = bottle.request.query.getall("cid")
        if not values or not values[0]:
            raise bad_request(f"{route} with no cid")
        environ[CID] = values[0]
        try:
            return validate_cid(values[0])
        except InvalidCid as err:
            raise bad_request(str(err)) from None

    def free_bytes() -> int:
        st = os.statvfs(spool.tmp)
        return st.f_bavail * st.f_frsize

    def insufficient_storage(close: bool = False) -> bottle.HTTPResponse:
        return reply("507 Insufficient Storage",
                     "Insufficient storage in the spool, try again later\n", close=close)

    def too_large() -> bottle.HTTPResponse:
        return reply("413 Request Entity Too Large",
                     f"Upload too large: the limit is {cfg.max_upload_bytes} bytes\n",
                     close=True)

    def receive(environ: dict[str, Any], length: int | None,
                write: Callable[[memoryview], None] | None) -> int:
        """Read the whole body into ``write`` (None: discard); the byte count."""
        stream = environ["wsgi.input"]
        readinto = getattr(stream, "readinto", None)  # ours: no copy, no allocation per read
        sink = WriteBehind(write, CHUNK) if write is not None else None
        spare = memoryview(bytearray(CHUNK))
        total = 0
        next_check = SPACE_CHECK_BYTES
        metrics.uploads_in_progress.inc()
        try:
            while length is None or total < length:
                want = CHUNK if length is None else min(CHUNK, length - total)
                buffer = sink.buffer() if sink is not None else spare  # raises write errors
                try:
                    if readinto is not None:
                        n = readinto(buffer[:want])
                    else:
                        data = stream.read(want)
                        n = len(data)
                        buffer[:n] = data
                except OSError as err:
                    if TOO_LARGE in str(err):
                        raise too_large() from None
                    what = "timed out" if isinstance(err, TimeoutError) else "connection lost"
                    of = "" if length is None else f" of {length}"
                    raise bad_request(f"upload {what} after {total}{of} bytes",
                                      close=True) from None
                except ValueError as err:
                    raise bad_request(f"malformed chunked body: {err}", close=True) from None
                if n == 0:
                    if length is None:
                        break
                    raise bad_request(f"body shorter than Content-Length ({total} of {length} "
                                      "bytes)", close=True)
                total += n
                environ[RECEIVED] = total
                if total > cfg.max_upload_bytes:
                    raise too_large()
                if sink is not None:
                    sink.put(buffer, n)
                    if length is None and total >= next_check:
                        next_check += SPACE_CHECK_BYTES
                        if free_bytes() < cfg.spool_reserve_bytes:
                            raise insufficient_storage(close=True)
            if sink is not None:
                sink.close()  # everything written; raises a write error
        finally:
            if sink is not None:
                sink.abort()
            metrics.uploads_in_progress.dec()
        return total

    @_route(app, "/pubapi/ping", "ping")
    def ping(environ: dict[str, Any]) -> bottle.HTTPResponse:
        return reply("200 OK", "OK\n")

    @_route(app, "/pubapi/config", "config")
    def get_config(environ: dict[str, Any]) -> bottle.HTTPResponse:
        return reply("200 OK", _config_body(config))

    @_route(app, "/pubapi/exists", "exists")
    def exists(environ: dict[str, Any]) -> bottle.HTTPResponse:
        authenticate(environ)
        location = catalog.locate(get_cid(environ, "exists"))
        return reply("200 OK", f"PRESENT:{location.path}\n" if location else "MISSING\n")

    @_route(app, "/pubapi/update", "update")
    def update(environ: dict[str, Any]) -> bottle.HTTPResponse:
        identity = authenticate(environ)
        cid = get_cid(environ, "update")
        location = catalog.locate(cid)
        if location is None:
            return reply("200 OK", "MISSING\n")
        spool.drop_stamp(cid, identity.submitter)
        return reply("200 OK", f"PRESENT:{location.path}\n")

    @_route(app, "/pubapi/status", "status")
    def status(environ: dict[str, Any]) -> bottle.HTTPResponse:
        authenticate(environ)
        cid = get_cid(environ, "status")
        state = spool.status(cid)  # before the catalog: a publisher publishes, then dequeues
        if state.state is State.QUEUED:
            return reply("200 OK", "QUEUED\n")
        if state.state is State.PUBLISHING:
            return reply("200 OK", "PUBLISHING\n")
        location = catalog.locate(cid)
        if location is not None:
            return reply("200 OK", f"PRESENT:{location.path}\n")
        if state.state is State.FAILED:
            return reply("200 OK", "FAILED:" + " ".join(state.reason.split()) + "\n")
        return reply("200 OK", "MISSING\n")

    @_route(app, "/pubapi/publish", "publish", "POST")
    def publish(environ: dict[str, Any]) -> bottle.HTTPResponse:
        identity = authenticate(environ)
        cid = get_cid(environ, "publish")
        chunked = bool(environ.get("wsgi.input_terminated")) or \
            "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower()
        length: int | None = None
        if not chunked:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                if length < 0:  # int() takes "-1", which cheroot passes on
                    raise ValueError(length)
            except ValueError:
                raise bad_request("invalid Content-Length", close=True) from None
            if length > cfg.max_upload_bytes:
                raise too_large()
        location = catalog.locate(cid)
        if location is not None:
            receive(environ, length, None)  # read and discarded, as the original does
            spool.drop_stamp(cid, identity.submitter)
            return reply("200 OK", f"PRESENT:{location.path}\n")
        if spool.status(cid).state in (State.QUEUED, State.PUBLISHING):
            receive(environ, length, None)
            return reply("200 OK", "OK\n")
        if free_bytes() - (length or 0) < cfg.spool_reserve_bytes:
            raise insufficient_storage(close=chunked)
        try:  # the entry's directory, the body, and meta.json at commit all take room
            with spool.writer(cid, identity.submitter) as writer:
                size = receive(environ, length, writer.write)
                result = writer.commit()
        except OSError as err:  # writing to the spool (reading errors are answered above)
            log.error("cannot write the upload of %s to the spool: %s", cid, err)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise insufficient_storage(close=True) from None
            raise
        if result is DropResult.QUEUED:
            metrics.upload_bytes.inc(size)
        return reply("200 OK", "OK\n")

    return app


def make_plain_app(config: Config, metrics: IngestMetrics, registry: CollectorRegistry
                   ) -> bottle.Bottle:
    """The plain-HTTP listener: ``/pubapi/ping``, ``/pubapi/config`` and ``/metrics`` only."""
    app = ApiApp(metrics)

    @_route(app, "/pubapi/ping", "ping")
    def ping(environ: dict[str, Any]) -> bottle.HTTPResponse:
        return reply("200 OK", "OK\n")

    @_route(app, "/pubapi/config", "config")
    def get_config(environ: dict[str, Any]) -> bottle.HTTPResponse:
        return reply("200 OK", _config_body(config))

    @_route(app, "/metrics", "metrics")
    def get_metrics(environ: dict[str, Any]) -> bottle.HTTPResponse:
        return bottle.HTTPResponse(generate_latest(registry), "200 OK",
                                   {"Content-Type": CONTENT_TYPE_LATEST})

    return app
