"""Calls to the other servers of the pair: mutual TLS with this host's certificate, short
timeouts, answers about a CID cached for a few seconds.

The routes called are the peers' ``/pubapi/peer/...`` (:mod:`ingest.peer_handlers`):

* ``GET state?cid=`` -> ``PRESENT:<path>``, ``QUEUED``, ``PUBLISHING`` or ``MISSING``, from the
  peer's own repositories and spool (never from its replicas: those are ours);
* ``GET claim?cid=&from=<us>`` -> ``PRESENT:<path>``, ``HELD`` (it takes this upload itself)
  or ``GRANTED``, before an upload is accepted, so that a CID sent to two servers at once is
  published once;
* ``POST lastuse`` with one CID per line -> JSON ``{cid: newest access time or null}``, from
  every copy the peer reads, for the janitor;
* ``GET masterkey?repo=`` -> the master public key (PEM) of a repository the peer publishes,
  for a replicator that has none yet (the mutual TLS of the call is what makes it trusted).

A peer that does not answer in time gives None: the caller decides from its replicas, and the
failure is logged (once a minute per peer).
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from userpub.config import Config
from userpub.pair import PeerConfig

__all__ = ["PeerAnswer", "PeerClient"]

log = logging.getLogger("userpub.peers")

MAX_ANSWER = 1 << 20
_LOG_EVERY = 60.0


@dataclass(frozen=True)
class PeerAnswer:
    """What one peer said (``text`` None: it could not be asked)."""

    peer: PeerConfig
    text: str | None


class PeerClient:
    """The other servers, reached over mutual TLS with this host's certificate."""

    def __init__(self, peers: Iterable[PeerConfig], me: str, *, certificate: Path, key: Path,
                 ca_dir: Path, timeout: float = 2.0, cache_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peers = tuple(peers)
        self.me = me
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._certificate, self._key, self._ca_dir = certificate, key, ca_dir
        self._context: ssl.SSLContext | None = None
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, *, timeout: float | None = None,
                    cache_seconds: float | None = None) -> PeerClient | None:
        """The peers of ``config`` reached with its ``[ingest]`` host certificate (``[pair]``
        timeout and cache unless given), or None without peers or an ``[ingest]`` section."""
        if not config.peers or config.ingest is None:
            return None
        return cls(config.peers, config.server.name, certificate=config.ingest.certificate,
                   key=config.ingest.key, ca_dir=config.ingest.ca_dir,
                   timeout=config.pair.timeout if timeout is None else timeout,
                   cache_seconds=(config.pair.cache_seconds if cache_seconds is None
                                  else cache_seconds))

    def _ssl(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl.create_default_context(capath=str(self._ca_dir))
            ctx.load_cert_chain(str(self._certificate), str(self._key))
            self._context = ctx
        return self._context

    def _call(self, peer: PeerConfig, method: str, path: str, body: bytes | None = None
              ) -> str | None:
        """The body of a 200 answer, or None (logged) when the peer cannot answer."""
        parts = urllib.parse.urlsplit(peer.url)
        try:
            conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                               context=self._ssl(), timeout=self.timeout)
            try:
                conn.request(method, f"/pubapi/peer/{path}", body=body,
                             headers={"User-Agent": f"userpub-peer/{self.me}"})
                response = conn.getresponse()
                text = response.read(MAX_ANSWER).decode("utf-8", "replace")
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, ssl.SSLError) as err:
            self._complain(peer, f"{type(err).__name__}: {err}")
            return None
        if response.status != 200:
            self._complain(peer, f"{response.status} {text.strip()[:200]}")
            return None
        return text

    def _complain(self, peer: PeerConfig, why: str) -> None:
        now = self.clock()
        with self._lock:
            if now - self._logged.get(peer.name, float("-inf")) < _LOG_EVERY:
                return
            self._logged[peer.name] = now
        log.warning("peer %s (%s) did not answer: %s; answering from this host's copies",
                    peer.name, peer.url, why)

    def state(self, cid: str) -> list[PeerAnswer]:
        """Where ``cid`` stands on every peer (answers cached ``cache_seconds``)."""
        answers = []
        quoted = urllib.parse.quote(cid, safe="")
        for peer in self.peers:
            key, now = (peer.name, cid), self.clock()
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None and now - cached[0] < self.cache_seconds:
                answers.append(PeerAnswer(peer, cached[1]))
                continue
            text = self._call(peer, "GET", f"state?cid={quoted}")
            text = text.strip() if text is not None else None
            with self._lock:
                self._cache[key] = (now, text)
                if len(self._cache) > 10_000:
                    self._cache.clear()
            answers.append(PeerAnswer(peer, text))
        return answers

    def claim(self, cid: str) -> list[PeerAnswer]:
        """Ask every peer to let this server take an upload of ``cid`` (never cached)."""
        query = (f"claim?cid={urllib.parse.quote(cid, safe='')}"
                 f"&from={urllib.parse.quote(self.me, safe='')}")
        answers = []
        for peer in self.peers:
            text = self._call(peer, "GET", query)
            answers.append(PeerAnswer(peer, text.strip() if text is not None else None))
        return answers

    def master_key(self, peer: PeerConfig, repository: str) -> bytes | None:
        """The master public key (PEM) of ``repository`` as ``peer`` publishes it, or None."""
        text = self._call(peer, "GET",
                          f"masterkey?repo={urllib.parse.quote(repository, safe='')}")
        if text is None or "-----BEGIN PUBLIC KEY-----" not in text:
            return None
        return text.encode()

    def last_use(self, cids: Iterable[str]) -> dict[str, float]:
        """The newest access time of each CID on any peer that answered (absent: unknown)."""
        body = "".join(f"{cid}\n" for cid in cids).encode()
        newest: dict[str, float] = {}
        for peer in self.peers:
            text = self._call(peer, "POST", "lastuse", body)
            if text is None:
                continue
            try:
                times = json.loads(text)
            except ValueError:
                self._complain(peer, "an answer that is not JSON")
                continue
            for cid, when in times.items():
                if isinstance(when, (int, float)):
                    newest[cid] = max(newest.get(cid, float("-inf")), float(when))
        return newest
