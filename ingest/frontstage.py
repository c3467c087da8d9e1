"""The front stage: one selector thread owns every connection until a request head is complete.

It replaces cheroot's connection manager, which handed every new connection straight to a
worker thread (so 16 silent connections held 16 workers) and re-dispatched keep-alive
connections as soon as they were readable (so a head dripping in a byte at a time held one).
Here, without blocking and without a worker:

* the TLS handshake (``handshake_timeout``), then the request line and header fields, up to
  ``max_head`` bytes (413/414 beyond), within ``header_timeout`` (408 after it, or a silent
  close if nothing came); between requests a keep-alive connection waits ``idle_timeout``;
* a body left unread by an early answer is discarded before the next head, at the pace a
  worker would demand of it; connections closed with a body still coming linger (our side
  shut, what arrives discarded) for up to ``LINGER_SECONDS``;
* at most ``max_per_client`` connections per client address: the next ones (as many again)
  are answered ``503`` with ``Retry-After`` once their head has arrived, any more are closed
  at once; at most ``max_connections`` in all: a new one evicts the connection held here
  that was active least recently (never one a worker is serving).

Only then does a connection go to cheroot's worker pool, with the bytes already read; a
worker thread is held by a request being served (an upload: bounded by the threads, the
socket timeout and the minimum rate of :class:`ingest.connection.Pace`), never by a client
that is slow to say what it wants.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any

from ingest.connection import LINGER_SECONDS, MIN_RATE, GridConnection
from ingest.frontslot import (
    EVENTS,
    RECEIVE_SIZE,
    Census,
    DoorLimits,
    Phase,
    Slot,
    Step,
    http_answer,
)

__all__ = ["FrontStage"]

log = logging.getLogger("userpub.ingest")

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
ACCEPT_BATCH = 64
RETRY_AFTER_SECONDS = 5
ANSWER_SECONDS = 10.0
SUMMARY_SECONDS = 60.0
_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_REFUSED = http_answer("503 Service Unavailable",
                       "Too many connections from your address, try again later\n",
                       f"Retry-After: {RETRY_AFTER_SECONDS}")


class FrontStage:
    """cheroot's connection manager (``run``, ``stop``, ``close``, ``put``), gated.

    ``server`` is the cheroot server (its listening socket, worker pool and
    ConnectionClass); ``adapter`` wraps accepted sockets in TLS (None: plain HTTP).
    ``totals`` counts the :data:`EVENTS` (what was refused, evicted or timed out); news of
    them is logged at most once a minute.
    """

    def __init__(self, server: Any, limits: DoorLimits, adapter: Any = None,
                 on_handshake_failure: Any = None) -> None:
        self.server = server
        self.limits = limits
        self.adapter = adapter
        self.on_handshake_failure = on_handshake_failure
        self.listener: socket.socket = server.socket
        self.listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, READ, self._wake_r)
        self.census = Census(limits.max_connections, limits.max_per_client)
        self._inbox: collections.deque[tuple[Slot, Phase]] = collections.deque()
        self._held: collections.OrderedDict[Slot, None] = collections.OrderedDict()  # LRU
        self._deadlines: list[tuple[float, int, Slot]] = []
        self._ticks = itertools.count(1)
        self._scratch = memoryview(bytearray(RECEIVE_SIZE))
        self._stop_requested = False
        self._serving = False
        self.running = threading.Event()  # set once the loop runs
        self._accept_paused_until = 0.0
        self.totals: collections.Counter[str] = collections.Counter()  # EVENTS since start
        self._logged: dict[str, int] = {}
        self._summary_at = time.monotonic() + SUMMARY_SECONDS

    # -- cheroot's connection-manager interface ------------------------------------------

    @property
    def can_add_keepalive_connection(self) -> bool:
        """Keep-alive connections cost no worker here: always, until stopped."""
        return not self._stop_requested

    def put(self, conn: GridConnection) -> None:
        """A worker is done with a request on ``conn``, which stays open (any thread)."""
        if self._stop_requested:
            conn.close_now()
            return
        self._post(conn.slot, Phase.HEAD)

    def run(self, expiration_interval: float) -> None:
        """Serve until :meth:`stop` (``expiration_interval`` is cheroot's; unused)."""
        self._serving = True
        self.running.set()
        try:
            while not self._stop_requested:
                self._once()
        finally:
            self._serving = False

    def stop(self) -> None:
        """Stop the loop (returns once it has)."""
        self._stop_requested = True
        self._wake()
        while self._serving:
            time.sleep(0.01)

    def close(self) -> None:
        """Close every connection held here (not those being served by workers)."""
        self._stop_requested = True
        for slot in list(self._held):
            self._close(slot)
        while self._inbox:
            self._inbox.popleft()[0].conn.close_now()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- what connections ask (ingest.connection.FrontDoor) ------------------------------

    def linger(self, conn: GridConnection) -> bool:
        """Linger on ``conn`` and close it here (any thread); False once stopping."""
        if self._stop_requested or conn.slot is None:
            return False
        self._post(conn.slot, Phase.LINGER)
        return True

    def release(self, conn: GridConnection) -> None:
        """``conn`` was closed (any thread)."""
        slot: Slot | None = conn.slot
        if slot is None:
            return
        slot.phase = Phase.CLOSED
        self.census.remove(slot.client, slot.refused)

    @property
    def open_connections(self) -> int:
        """Connections open now (held here, queued for or served by workers)."""
        return self.census.total

    # -- the loop ------------------------------------------------------------------------

    def _post(self, slot: Slot, phase: Phase) -> None:
        self._inbox.append((slot, phase))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"x")

    def _once(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self.listener, READ, None)
        timeout = 1.0
        if self._deadlines:
            timeout = min(timeout, max(0.0, self._deadlines[0][0] - now))
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._accept()
            elif key.data is self._wake_r:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            else:
                self._touch(key.data)
                self._advance(key.data)
        while self._inbox:
            self._take_back(*self._inbox.popleft())
        self._expire(time.monotonic())
        self._summarize()

    # -- admission -----------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionError, PermissionError):  # reset before accepted, firewall
                continue
            except OSError as err:
                if err.errno not in _OUT_OF_FILES:
                    raise
                self._note("out_of_files")
                log.warning("cannot accept a connection: %s", err.strerror)
                if not self._evict():  # nothing to free: stop accepting for a moment
                    self._selector.unregister(self.listener)
                    self._accept_paused_until = time.monotonic() + 0.1
                return
            try:
                self._admit(sock, address)
            except OSError as err:  # the peer is gone already
                log.debug("%s: cannot take the connection: %s", address[0], err)
                sock.close()

    def _admit(self, sock: socket.socket, address: Any) -> None:
        client = str(address[0])
        refused, hopeless, full = self.census.judge(client)
        if hopeless or (full and not self._evict()):
            self._note("client_limit" if hopeless else "full")
            sock.close()
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # answers are written in pieces: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.adapter is not None:
            try:
                sock = self.adapter.wrap(sock)[0]
            except Exception as err:  # the peer reset the connection already, ...
                log.debug("%s: cannot set up TLS: %s", client, err)
                sock.close()
                return
        conn: GridConnection = self.server.ConnectionClass(self.server, sock)
        conn.remote_addr, conn.remote_port = client, address[1]
        conn.front = self
        tls = self.adapter is not None
        slot = Slot(conn, client, refused, Phase.HANDSHAKE if tls else Phase.HEAD,
                    self._scratch)
        conn.slot = slot
        self.census.add(client, refused)
        if refused:
            self._note("refused")
        self._held[slot] = None
        limits = self.limits
        self._set_deadline(slot, limits.handshake_timeout if tls else limits.header_timeout)
        try:
            self._want(slot, READ)
        except (OSError, ValueError):
            self._close(slot)

    def _evict(self) -> bool:
        """Close the connection held here that was active least recently; False if none."""
        if not self._held:
            return False
        slot = next(iter(self._held))
        self._note("evicted")
        self._close(slot)
        return True

    # -- advancing connections -----------------------------------------------------------

    def _advance(self, slot: Slot) -> None:
        """Advance ``slot`` as far as its socket allows."""
        try:
            while self._step(slot):
                pass
        except Exception:  # one connection's trouble must not stop the others
            log.exception("front stage: %s failed in %s", slot.client, slot.phase.value)
            self._close(slot)

    def _step(self, slot: Slot) -> bool:
        """One step of ``slot``; True if another may follow at once."""
        phase = slot.phase
        if phase is Phase.HANDSHAKE:
            step = slot.handshake()
        elif phase is Phase.HEAD:
            was_idle = not slot.conn.rfile.buffer
            step = slot.read_head(self.limits.max_head)
            if was_idle and slot.served and slot.conn.rfile.buffer:
                self._set_deadline(slot, self.limits.header_timeout)  # a request begins
        elif phase is Phase.DISCARD:
            before = slot.conn.discard
            step = slot.discard()
            if slot.conn.discard < before:  # the pace a worker would demand of the body
                self._set_deadline(slot, slot.deadline - time.monotonic()
                                   + (before - slot.conn.discard) / MIN_RATE)
        elif phase is Phase.ANSWER:
            step = slot.send()
        elif phase is Phase.LINGER:
            step = slot.drain()
        else:
            return False
        return self._follow(slot, step)

    def _follow(self, slot: Slot, step: Step) -> bool:
        """Act on ``step``; True if ``slot`` should be advanced again at once."""
        if step in (Step.WANT_READ, Step.WANT_WRITE):
            self._want(slot, READ if step is Step.WANT_READ else WRITE)
            return False
        if step is Step.FAILED:
            reason, bad_certificate, gone = slot.failure
            log.log(logging.DEBUG if gone else logging.INFO, "%s TLS handshake failed: %s",
                    slot.client, reason)
            if self.on_handshake_failure is not None:
                self.on_handshake_failure(slot.client, reason, bad_certificate)
            self._close(slot)
            return False
        if step is Step.GONE:
            self._close(slot)
            return False
        if step is Step.HANDSHAKEN:
            slot.phase = Phase.HEAD
            self._set_deadline(slot, self.limits.header_timeout)
            return True
        if step is Step.HEAD:
            if not slot.refused:
                self._dispatch(slot)
                return False
            self._answer(slot, _REFUSED)
            return True
        if step is Step.TOO_LARGE:
            self._note("head_too_large")
            self._answer(slot, slot.too_large_answer(self.limits.max_head))
            return True
        if step is Step.DISCARDED:
            self._wait_for_next(slot)
            return True
        # Step.SENT
        if slot.linger_after:
            return self._start_linger(slot)
        self._close(slot)
        return False

    def _dispatch(self, slot: Slot) -> None:
        """Hand ``slot``'s connection, its head buffered, to the worker pool."""
        self._release_hold(slot)
        slot.phase = Phase.WORKER
        slot.tick = 0
        slot.served += 1
        slot.conn.socket.settimeout(self.server.timeout)
        self.server.process_conn(slot.conn)

    def _take_back(self, slot: Slot, phase: Phase) -> None:
        """A worker handed ``slot`` back: for the next request (HEAD) or to linger."""
        if slot.phase is Phase.CLOSED:
            return
        conn = slot.conn
        try:
            conn.socket.setblocking(False)
        except OSError:
            conn.close_now()
            return
        self._held[slot] = None
        if phase is Phase.LINGER:
            if self._start_linger(slot):
                self._advance(slot)
            return
        if conn.discard:
            slot.phase = Phase.DISCARD
            self._set_deadline(slot, self.limits.body_timeout)
        else:
            self._wait_for_next(slot)
        self._advance(slot)

    def _wait_for_next(self, slot: Slot) -> None:
        slot.phase = Phase.HEAD
        slot.scanned = 0
        limits = self.limits
        busy = slot.conn.rfile.has_data()  # pipelined: the next request has begun
        self._set_deadline(slot, limits.header_timeout if busy else limits.idle_timeout)

    def _answer(self, slot: Slot, answer: bytes, linger_after: bool = True) -> None:
        slot.start_answer(answer, linger_after)
        self._set_deadline(slot, ANSWER_SECONDS)

    def _start_linger(self, slot: Slot) -> bool:
        """Shut our side and discard what comes for LINGER_SECONDS; False if closed."""
        slot.phase = Phase.LINGER
        if not slot.shut():
            self._close(slot)
            return False
        self._set_deadline(slot, LINGER_SECONDS)
        return True

    # -- bookkeeping ---------------------------------------------------------------------

    def _touch(self, slot: Slot) -> None:
        if slot in self._held:
            self._held.move_to_end(slot)

    def _release_hold(self, slot: Slot) -> None:
        self._held.pop(slot, None)
        if slot.events:
            slot.events = 0
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(slot.conn.socket)

    def _want(self, slot: Slot, events: int) -> None:
        if slot.events == events:
            return
        sock = slot.conn.socket
        if slot.events:
            self._selector.modify(sock, events, slot)
        else:
            self._selector.register(sock, events, slot)
        slot.events = events

    def _set_deadline(self, slot: Slot, seconds: float) -> None:
        slot.tick = next(self._ticks)
        slot.deadline = time.monotonic() + seconds
        heapq.heappush(self._deadlines, (slot.deadline, slot.tick, slot))

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, tick, slot = heapq.heappop(self._deadlines)
            if tick == slot.tick and slot.phase not in (Phase.WORKER, Phase.CLOSED):
                self._timed_out(slot)

    def _timed_out(self, slot: Slot) -> None:
        if slot.phase is Phase.HEAD and slot.conn.rfile.has_data():
            self._note("head_timeout")
            self._answer(slot, http_answer(
                "408 Request Timeout",
                f"Request timeout: the request head did not arrive within "
                f"{self.limits.header_timeout:g} s\n"), linger_after=False)
            self._advance(slot)
            return
        if slot.phase is Phase.HANDSHAKE:
            self._note("handshake_timeout")
        elif slot.phase is Phase.HEAD:
            self._note("idle" if slot.served else "silent")
        elif slot.phase is Phase.DISCARD:
            self._note("discard_timeout")
        self._close(slot)

    def _close(self, slot: Slot) -> None:
        self._release_hold(slot)
        slot.tick = 0
        slot.conn.close_now()

    def _note(self, event: str) -> None:
        self.totals[event] += 1

    def _summarize(self) -> None:
        now = time.monotonic()
        if now < self._summary_at:
            return
        self._summary_at = now + SUMMARY_SECONDS
        news = {event: n - self._logged.get(event, 0) for event, n in self.totals.items()
                if event != "idle" and n > self._logged.get(event, 0)}
        self._logged = dict(self.totals)
        if news:
            log.info("front door (%s), last %.0f s: %s; %d connections open",
                     _join(self.listener), SUMMARY_SECONDS,
                     ", ".join(f"{EVENTS[e]} {n}" for e, n in sorted(news.items())),
                     self.open_connections)

    @property
    def held(self) -> int:
        """Connections held here (handshake, head, idle, discarding, answered, lingering)."""
        return len(self._held)


def _join(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "closed"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

