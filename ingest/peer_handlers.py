"""``/pubapi/peer/...``: what the other servers of the pair ask this one.

Only a peer's host certificate (its subject is a ``[[peer]] dn``) may call these routes:

* ``GET state?cid=``: ``PRESENT:<path>``, ``QUEUED``, ``PUBLISHING`` or ``MISSING``, from this
  server's own repositories, spool and uploads in progress (never its replicas);
* ``GET claim?cid=&from=<peer>``: may the peer take an upload of ``cid``? ``PRESENT:<path>``,
  ``HELD`` (this server takes it: it is queued, publishing, or being uploaded here and this
  server wins the tie) or ``GRANTED``;
* ``POST lastuse`` (a CID per line): JSON ``{cid: newest access time or null}`` over every copy
  this server reads, for the janitor of the peer;
* ``GET masterkey?repo=``: the master public key (PEM) of a cvmfs-native repository this
  server publishes, for the peer's replicator.

The claim decides, between servers receiving one CID at the same time, which one keeps it:
an upload this server has confirmed (every peer granted it) always holds; two unconfirmed
uploads are decided by name, the smaller wins. Each side reaches the same verdict whatever the
order of the calls, so the CID is published once.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import bottle

from ingest.auth import AuthError, chain_from_environ, identity_from_chain
from ingest.responses import CID, IDENTITY, reply
from publisher.repositories.cvmfs_native import key_files
from spool import State
from userpub.pair import PeerConfig

if TYPE_CHECKING:
    from ingest.handlers import Api

__all__ = ["MAX_LASTUSE", "Uploads", "claim", "last_use", "master_key", "peer_of", "state"]

MAX_LASTUSE = 100_000  # CIDs one lastuse call may ask about


class Uploads:
    """The uploads in progress on this server, per CID: unconfirmed and confirmed (every peer
    granted them) counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uploads: dict[str, list[int]] = {}

    def begin(self, cid: str) -> None:
        """An upload of ``cid`` starts, unconfirmed (uploads of one CID may overlap)."""
        with self._lock:
            self._uploads.setdefault(cid, [0, 0])[0] += 1

    def confirm(self, cid: str) -> None:
        """Every peer granted an upload of ``cid`` begun here."""
        with self._lock:
            counts = self._uploads[cid]
            counts[0] -= 1
            counts[1] += 1

    def end(self, cid: str, confirmed: bool) -> None:
        """An upload of ``cid`` is over (spooled, refused or failed)."""
        with self._lock:
            counts = self._uploads[cid]
            counts[1 if confirmed else 0] -= 1
            if counts == [0, 0]:
                del self._uploads[cid]

    def holds(self, cid: str, me: str, other: str) -> bool:
        """True when an upload here keeps ``cid`` against a claim by ``other``: a confirmed
        one always, an unconfirmed one when ``me`` sorts before ``other``."""
        with self._lock:
            unconfirmed, confirmed = self._uploads.get(cid, (0, 0))
            return confirmed > 0 or (unconfirmed > 0 and me < other)


def peer_of(api: Api, environ: dict[str, Any]) -> PeerConfig:
    """The calling peer, or raise 403 (only the configured peers' host certificates)."""
    chain = chain_from_environ(environ)
    if not chain:
        raise reply("403 Access denied", "Peer certificate required\n")
    try:
        dn = identity_from_chain(chain, False)
    except AuthError as err:
        raise reply("403 Access denied", f"{err.message}\n") from None
    peer = api.config.trusted_peer(dn)
    if peer is None:
        environ[IDENTITY] = f"refused peer: {dn or '-'}"
        raise reply("403 Access denied", "Not a peer of this server\n")
    environ[IDENTITY] = f"peer {peer.name}"
    return peer


def _own_state(api: Api, cid: str) -> str:
    """Where ``cid`` stands on this server alone."""
    location = api.own.locate(cid)
    if location is not None:
        return f"PRESENT:{location.path}"
    spooled = api.spool.status(cid).state
    if spooled is State.QUEUED:
        return "QUEUED"
    if spooled is State.PUBLISHING:
        return "PUBLISHING"
    return "MISSING"


def state(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/peer/state?cid=``."""
    peer_of(api, environ)
    cid = api.cid(environ, "state")
    answer = _own_state(api, cid)
    if answer == "MISSING" and api.uploads.holds(cid, api.config.server.name, ""):
        answer = "QUEUED"  # an upload in progress here
    return reply("200 OK", f"{answer}\n")


def claim(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/peer/claim?cid=&from=``."""
    peer = peer_of(api, environ)
    cid = api.cid(environ, "claim")
    own = _own_state(api, cid)
    if own.startswith("PRESENT:"):
        return reply("200 OK", f"{own}\n")
    if own != "MISSING" or api.uploads.holds(cid, api.config.server.name, peer.name):
        return reply("200 OK", "HELD\n")
    return reply("200 OK", "GRANTED\n")


def last_use(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``POST /pubapi/peer/lastuse``: a CID per line in, JSON out."""
    peer_of(api, environ)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length > MAX_LASTUSE * 260:
        return reply("413 Request Entity Too Large", "Too many CIDs\n")
    body = environ["wsgi.input"].read(length).decode("utf-8", "replace")
    cids = [line.strip() for line in body.splitlines() if line.strip()][:MAX_LASTUSE]
    environ[CID] = f"{len(cids)} cids"
    answer = {cid: api.catalog.last_access(cid) for cid in cids}
    return bottle.HTTPResponse(json.dumps(answer), "200 OK",
                               {"Content-Type": "application/json", "Cache-Control": "max-age=0"})


def master_key(api: Api, environ: dict[str, Any]) -> bottle.HTTPResponse:
    """``GET /pubapi/peer/masterkey?repo=``."""
    peer_of(api, environ)
    name = str(bottle.request.query.get("repo", ""))
    environ[CID] = name
    repo = next((r for r in api.config.hosted if r.name == name), None)
    if repo is None or repo.backend != "cvmfs-native":
        return reply("404 Not Found", "Not a cvmfs-native repository published here\n")
    try:
        pem = key_files(api.config, repo).master_public.read_bytes()
    except OSError:
        return reply("404 Not Found", "No master key yet\n")
    return bottle.HTTPResponse(pem, "200 OK", {"Content-Type": "application/x-pem-file",
                                               "Cache-Control": "max-age=0"})
