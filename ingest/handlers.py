"""The handlers of ``/pubapi/*``, one function per route, in the order a client meets them.

Each handler takes the :class:`Api` (what every handler needs: configuration, spool,
catalog, metrics, authenticator) and the WSGI environ, and returns the answer or raises it
(a ``bottle.HTTPResponse``). Handlers read ``request.query`` and the raw ``wsgi.input`` only
(bottle's ``request.body`` buffers the body and breaks chunked uploads under cheroot). The
routes are wired in :mod:`ingest.app`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bottle
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingest.auth import Authenticator, AuthError, Identity
from ingest.peer_handlers import Uploads
from ingest.readiness import Readiness
from ingest.responses import CID, IDENTITY, bad_request, reply
from ingest.upload import free_bytes, insufficient_storage, receive, too_large
from ingest.upload_check import UploadCheck
from metrics import IngestMetrics
from publisher.repositories.catalog import Catalog, Location
from publisher.tarball import UnpackLimits
from spool import CidMismatch, DropResult, Spool, State
from userpub.config import Config, IngestConfig
from userpub.peers import PeerClient
from userpub_client.cid import InvalidCid, normalize_cid

__all__ = ["Api", "StampLimiter", "config_answer", "exists", "metrics_answer", "ping", "publish", "status",
           "update"]

log = logging.getLogger("userpub.ingest.access")


class StampLimiter:
    """Which CIDs are due an access stamp: each at most once per ``interval`` seconds.

    Remembers the ``capacity`` most recently stamped CIDs (older ones are forgotten and may be
    stamped again early, which only costs a stamp).
    """

    def __init__(self, interval: float, capacity: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.capacity = capacity
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def due(self, cid: str) -> bool:
        """True (and remembered) when ``cid`` was not stamped within the interval."""
        now = self.clock()
        with self._lock:
            last = self._last.get(cid)
            if last is not None and now - last < self.interval:
                return False
            self._last[cid] = now
            self._last.move_to_end(cid)
            while len(self._last) > self.capacity:
                self._last.popitem(last=False)
            return True


@dataclass(frozen=True)
class Api:
    """What the handlers of the HTTPS API share."""

    config: Config
    ingest: IngestConfig
    spool: Spool
    catalog: Catalog
    metrics: IngestMetrics
    authenticator: Authenticator
    own: Catalog  # the repositories this server publishes (authoritative answers for peers)
    stamps: StampLimiter = field(default_factory=lambda: StampLimiter(3600.0))
    peers: PeerClient | None = None  # the other servers of the pair
    uploads: Uploads = field(default_factory=Uploads)
    ready: Callable[[], str | None] = lambda: None  # why this host cannot publish now

    def locate(self, cid: str) -> Location | None:
        """Where ``cid`` is published: this host's copies, else what a peer says (its own
        repositories are fresher than our replica of them: no blind window)."""
        location = self.catalog.locate(cid)
        if location is None and self.peers is not None:
            for answer in self.peers.state(cid):
                if answer.text is not None and answer.text.startswith("PRESENT:"):
                    return Location(answer.peer.name, answer.text.removeprefix("PRESENT:"))
        return location

    def state_elsewhere(self, cid: str) -> str | None:
        """``QUEUED`` or ``PUBLISHING`` when a peer is publishing ``cid``, else None."""
        for answer in self.peers.state(cid) if self.peers is not None else ():
            if answer.text in ("QUEUED", "PUBLISHING"):
                return answer.text
        return None

    def claim(self, cid: str) -> str | None:
        """Ask the peers before accepting an upload of ``cid``: the answer to give instead
        (``PRESENT:<path>``, or ``OK`` when a peer takes it), or None to take it here."""
        if self.peers is None:
            return None
        for answer in self.peers.claim(cid):
            if answer.text is not None and answer.text.startswith("PRESENT:"):
                return answer.text
            if answer.text == "HELD":
                log.info("%s: taken by peer %s; this upload is read and discarded", cid,
                         answer.peer.name)
                return "OK"
        return None

    def authenticate(self, environ: dict[str, Any]) -> Identity:
        """The caller's identity, or raise the original's 403 answer."""
        try:
            identity = self.authenticator.authenticate(environ)
        except AuthError as err:
            self.metrics.auth_failures.labels(err.reason).inc()
            environ[IDENTITY] = f"refused {err.reason}: {err.subject or '-'}"
            raise reply("403 Access denied", f"{err.message}\n") from None
        environ[IDENTITY] = identity.name
        return identity

    def cid(self, environ: dict[str, Any], route: str) -> str:
        """The request's valid ``cid``, or raise the original's 400 answer."""
        values = bottle.request.query.getall("cid")
        if not values or not values[0]:
            raise bad_request(f"{route} with no cid")
        environ[CID] = values[0]
        try:
            return normalize_cid(values[0])
        except InvalidCid as err:
            raise bad_request(str(err)) from None

    def may_publish(self, identity: Identity, cid: str) -> None:
        """Raise 403 when the CID's group has named publishers and the caller is not one."""
        group = cid.partition("/")[0] if "/" in cid else None
        for name, allowed in self.ingest.group_publishers:
            if name == group and not identity.is_one_of(allowed):
                raise reply("403 Access denied",
                            f"{identity.name} may not publish in group {group}\n")

    def has_room(self, upcoming: int = 0) -> bool:
        """True while the spool keeps its reserve after ``upcoming`` more bytes."""
        return free_bytes(self.spool.tmp) - upcoming >= self.ingest.spool_reserve_bytes

    def receive(self, environ: dict[str, Any], length: int | None, write: Any,
                check: UploadCheck | None = None) -> int:
        """The whole body into ``write`` (None: read and discarded); the byte count."""
        return receive(environ, length, write, limit=self.ingest.max_upload_bytes,
                       metrics=self.metrics, room=self.has_room, check=check)

    def upload_check(self, cid: str) -> UploadCheck | None:
        """The judge of a new upload of ``cid`` (None when ``check_uploads`` is off)."""
        if self.ingest.check_uploads == "off":
            return None
        publisher = self.config.publisher
        limits = UnpackLimits(publisher.max_members, publisher.max_unpacked_bytes)
        longest = max(len(os.fsencode(f"{r.mount}/{self.config.server.prefix}/{cid}/"))
                      for r in self.config.repositories)
        return UploadCheck(limits, longest, whole=self.ingest.check_uploads == "full")


def ping(readiness: Readiness, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/ping``: OK while this host can accept and publish; else the original's
    "not running" answer, so that health checks take the host out."""
    problem = readiness.problem()
    if problem is not None:
        environ[IDENTITY] = f"not ready: {problem}"
        return bad_request("Service not running")
    return reply("200 OK", "OK\n")


def config_answer(config: Config) -> bottle.HTTPResponse:
    """``GET /pubapi/config``: ``repos:r1,r2,...``, every repository of the site."""
    return reply("200 OK", "repos:" + ",".join(r.name for r in config.repositories) + "\n")


def exists(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/exists?cid=``: PRESENT:<path> or MISSING.

    Unlike the original, a PRESENT answer counts as use (``stamp_on_exists``): the CID is
    stamped, at most once an hour, so code that clients only look up (justIN never calls
    ``update``) does not expire while it is used.
    """
    identity = api.authenticate(environ)
    cid = api.cid(environ, "exists")
    location = api.locate(cid)
    if location is None:
        return reply("200 OK", "MISSING\n")
    if api.ingest.stamp_on_exists and api.stamps.due(cid):
        api.spool.drop_stamp(cid, identity.submitter)
    return reply("200 OK", f"PRESENT:{location.path}\n")


def update(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/update?cid=``: as exists, and a present CID is stamped (used again)."""
    identity = api.authenticate(environ)
    cid = api.cid(environ, "update")
    location = api.locate(cid)
    if location is None:
        return reply("200 OK", "MISSING\n")
    api.spool.drop_stamp(cid, identity.submitter)
    return reply("200 OK", f"PRESENT:{location.path}\n")


def status(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/status?cid=``: QUEUED, PUBLISHING, PRESENT:<path>, FAILED:<reason>, MISSING."""
    api.authenticate(environ)
    cid = api.cid(environ, "status")
    state = api.spool.status(cid)  # before the catalog: a publisher publishes, then dequeues
    if state.state is State.QUEUED:
        return reply("200 OK", "QUEUED\n")
    if state.state is State.PUBLISHING:
        return reply("200 OK", "PUBLISHING\n")
    location = api.locate(cid)
    if location is not None:
        return reply("200 OK", f"PRESENT:{location.path}\n")
    if (elsewhere := api.state_elsewhere(cid)) is not None:
        return reply("200 OK", f"{elsewhere}\n")
    if state.state is State.FAILED:
        return reply("200 OK", "FAILED:" + " ".join(state.reason.split()) + "\n")
    return reply("200 OK", "MISSING\n")


def _content_length(api: Api, environ: dict[str, Any]) -> int | None:
    """The body's declared length (None: chunked); 400 or 413 raised when unacceptable."""
    chunked = bool(environ.get("wsgi.input_terminated")) or \
        "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower()
    if chunked:
        return None
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length < 0:  # int() takes "-1", which cheroot passes on
            raise ValueError(length)
    except ValueError:
        raise bad_request("invalid Content-Length", close=True) from None
    if length > api.ingest.max_upload_bytes:
        raise too_large(api.ingest.max_upload_bytes)
    return length


def publish(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``POST /pubapi/publish?cid=``: the tarball body; OK once durable in the spool.

    A CID already published answers PRESENT:<path> and is stamped; one already waiting or
    publishing answers OK. Either way the body is read and discarded, as the original does.
    """
    identity = api.authenticate(environ)
    cid = api.cid(environ, "publish")
    api.may_publish(identity, cid)
    length = _content_length(api, environ)
    if api.peers is not None and api.ready() is not None:
        # a peer can take it now: the original's answer, and clients try another server
        return bad_request("Service not running", close=True)
    location = api.catalog.locate(cid)
    if location is not None:
        api.receive(environ, length, None)
        api.spool.drop_stamp(cid, identity.submitter)
        return reply("200 OK", f"PRESENT:{location.path}\n")
    if api.spool.status(cid).state in (State.QUEUED, State.PUBLISHING):
        api.receive(environ, length, None)
        return reply("200 OK", "OK\n")
    api.uploads.begin(cid)
    confirmed = False
    try:
        if (answer := api.claim(cid)) is not None:  # a peer has it, or is taking it
            api.receive(environ, length, None)
            return reply("200 OK", f"{answer}\n")
        api.uploads.confirm(cid)
        confirmed = True
        return _accept(api, environ, identity, cid, length)
    finally:
        api.uploads.end(cid, confirmed)


def _accept(api: Api, environ: dict[str, Any], identity: Identity, cid: str,
            length: int | None) -> bottle.HTTPResponse:
    """Receive a new upload of ``cid`` into the spool: ``OK`` once it is durable."""
    if not api.has_room(length or 0):
        raise insufficient_storage(close=length is None)
    try:  # the entry's directory, the body, and meta.json at commit all take room
        with api.spool.writer(cid, identity.submitter) as writer:
            size = api.receive(environ, length, writer.write, api.upload_check(cid))
            try:
                writer.check_cid()  # nobody publishes under the hash of someone else's tarball
            except CidMismatch as err:
                raise bad_request(str(err)) from None
            result = writer.commit()
    except OSError as err:  # writing to the spool (reading errors are answered above)
        log.error("cannot write the upload of %s to the spool: %s", cid, err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise insufficient_storage(close=True) from None
        raise
    if result is DropResult.QUEUED:
        api.metrics.upload_bytes.inc(size)
    return reply("200 OK", "OK\n")


def metrics_answer(registry: CollectorRegistry) -> bottle.HTTPResponse:
    """``GET /metrics`` (plain listener): the process's Prometheus metrics."""
    return bottle.HTTPResponse(generate_latest(registry), "200 OK",
                               {"Content-Type": CONTENT_TYPE_LATEST})
