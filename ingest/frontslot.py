"""The front stage's vocabulary (limits, events, phases), and one connection while it holds it.

A :class:`Slot` wraps a :class:`~ingest.connection.GridConnection` and knows how to advance
it by one step as far as the socket allows: the TLS handshake, reading a request head into
the connection's buffer, discarding an unread body, sending a refusal, lingering. Each step
returns a :class:`Step` saying what happened; the front stage decides what follows (the
deadlines, the selector, the limits and the hand-over to workers are its business).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import re
import socket
import ssl
import threading
from dataclasses import dataclass

from ingest.connection import GridConnection

__all__ = ["EVENTS", "Census", "DoorLimits", "Phase", "Slot", "Step", "handshake_problem", "http_answer"]

RECEIVE_SIZE = 1 << 16
_HEAD_END = re.compile(rb"\n\r?\n")


@dataclass(frozen=True)
class DoorLimits:
    """Time and count limits of one listener's front stage."""

    handshake_timeout: float
    header_timeout: float
    idle_timeout: float
    body_timeout: float  # socket_timeout: the pace of a body being discarded
    max_connections: int
    max_per_client: int  # 0: no limit
    max_head: int


EVENTS = {  # what ``FrontStage.totals`` counts
    "refused": "answered 503 (client over its limit)",
    "client_limit": "closed at once (client at twice its limit)",
    "full": "closed at once (no room)",
    "evicted": "closed to make room (active least recently)",
    "handshake_timeout": "closed in the TLS handshake (too slow)",
    "silent": "closed before a first request (nothing sent)",
    "idle": "closed while idle between requests",
    "head_timeout": "answered 408 (head too slow)",
    "head_too_large": "answered 413/414 (head too large)",
    "discard_timeout": "closed while discarding an unread body (too slow)",
    "out_of_files": "accept failed (out of file descriptors)",
}


class Census:
    """Open connections, in all and per client address; thread-safe (workers close them)."""

    def __init__(self, max_connections: int, max_per_client: int) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._lock = threading.Lock()
        self._total = 0
        self._per_client: collections.Counter[str] = collections.Counter()
        self._refusing: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        """Connections open now."""
        with self._lock:
            return self._total

    def judge(self, client: str) -> tuple[bool, bool, bool]:
        """For a new connection of ``client``: (over its limit: answer 503, twice over it:
        close at once, no room left in all)."""
        limit = self.max_per_client
        with self._lock:
            refused = bool(limit) and self._per_client[client] >= limit
            hopeless = refused and self._refusing[client] >= limit
            return refused, hopeless, self._total >= self.max_connections

    def add(self, client: str, refused: bool) -> None:
        """A connection of ``client`` was taken (``refused``: to be answered 503)."""
        with self._lock:
            self._total += 1
            self._per_client[client] += 1
            if refused:
                self._refusing[client] += 1

    def remove(self, client: str, refused: bool) -> None:
        """A connection of ``client`` was closed."""
        with self._lock:
            self._total -= 1
            for counter in (self._per_client, self._refusing) if refused \
                    else (self._per_client,):
                counter[client] -= 1
                if counter[client] <= 0:
                    del counter[client]


class Phase(enum.Enum):
    """Where a connection is."""

    HANDSHAKE = "handshake"
    HEAD = "head"
    DISCARD = "discard"
    ANSWER = "answer"
    LINGER = "linger"
    WORKER = "worker"
    CLOSED = "closed"


class Step(enum.Enum):
    """The outcome of advancing a slot."""

    WANT_READ = "want read"  # wait until the socket is readable
    WANT_WRITE = "want write"  # ... writable
    GONE = "gone"  # end of stream, reset or a TLS error: close
    FAILED = "failed"  # the handshake failed (``Slot.failure`` says why): close
    HANDSHAKEN = "handshaken"
    HEAD = "head"  # a complete request head is buffered
    TOO_LARGE = "too large"  # ``max_head`` bytes and no end of head
    DISCARDED = "discarded"  # the unread body is gone: the next head may follow
    SENT = "sent"  # the answer is out


def handshake_problem(err: OSError) -> tuple[str, bool]:
    """(one-line reason of a failed handshake, whether the client certificate was refused)."""
    verify = getattr(err, "verify_message", None)
    reason = getattr(err, "reason", None) or err.strerror or str(err) or type(err).__name__
    text = f"{reason}: {verify}" if verify else str(reason)
    return text, bool(verify) or "CERTIFICATE" in text.upper()


def http_answer(status: str, text: str, *extra: str) -> bytes:
    """A complete plain-text answer that closes the connection."""
    body = text.encode()
    head = [f"HTTP/1.1 {status}", "Content-Type: text/plain", f"Content-Length: {len(body)}",
            *extra, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Slot:
    """The front stage's record of one connection, and its non-blocking steps.

    ``scratch`` is a receive buffer shared by every slot of one front stage (one thread).
    """

    __slots__ = ("client", "conn", "deadline", "events", "failure", "linger_after", "outgoing",
                 "phase", "refused", "scanned", "scratch", "served", "tick")

    def __init__(self, conn: GridConnection, client: str, refused: bool, phase: Phase,
                 scratch: memoryview) -> None:
        self.conn = conn
        self.client = client
        self.refused = refused  # over its client's limit: answered 503
        self.phase = phase
        self.scratch = scratch
        self.events = 0  # registered with the selector for these
        self.tick = 0  # identifies the slot's current deadline
        self.deadline = 0.0  # time.monotonic() at which the phase times out
        self.served = 0  # requests handed to workers
        self.scanned = 0  # bytes of the buffer searched for the end of the head
        self.outgoing = memoryview(b"")
        self.linger_after = True
        self.failure: tuple[str, bool, bool] = ("", False, False)  # reason, bad cert, gone

    def _receive(self, view: memoryview) -> int | Step:
        """Bytes received into ``view``, or the step that stops receiving."""
        try:
            n = int(self.conn.socket.recv_into(view))
        except (ssl.SSLWantReadError, BlockingIOError):
            return Step.WANT_READ
        except ssl.SSLWantWriteError:
            return Step.WANT_WRITE
        except OSError:
            return Step.GONE
        return n if n else Step.GONE

    def handshake(self) -> Step:
        """Advance the TLS handshake."""
        try:
            self.conn.socket.do_handshake()
        except ssl.SSLWantReadError:
            return Step.WANT_READ
        except ssl.SSLWantWriteError:
            return Step.WANT_WRITE
        except OSError as err:  # ssl.SSLError, ConnectionResetError, ...
            reason, bad_certificate = handshake_problem(err)
            self.failure = (reason, bad_certificate,
                            isinstance(err, (ssl.SSLEOFError, ConnectionError)))
            return Step.FAILED
        # TLS 1.3 without tickets: nothing of ours follows the client's Finished, so its ACK
        # would be delayed (40 ms), and a client with Nagle's algorithm on holds its request
        # back until then. Acknowledge at once.
        with contextlib.suppress(OSError, AttributeError):
            self.conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return Step.HANDSHAKEN

    def read_head(self, max_head: int) -> Step:
        """Receive until the buffer holds a complete head (HEAD) or ``max_head`` bytes
        without one (TOO_LARGE)."""
        reader = self.conn.rfile
        while True:
            if reader.buffer:
                found = _HEAD_END.search(reader.buffer, max(0, self.scanned - 2))
                self.scanned = len(reader.buffer)
                if found is not None and found.end() <= max_head:
                    self.scanned = 0
                    return Step.HEAD
                if found is not None or len(reader.buffer) > max_head:
                    return Step.TOO_LARGE
            got = self._receive(self.scratch)
            if isinstance(got, Step):
                return got
            reader.feed(self.scratch[:got])

    def too_large_answer(self, max_head: int) -> bytes:
        """414 when even the request line is too long, else 413."""
        if self.conn.rfile.buffer.find(b"\n", 0, max_head) < 0:
            return http_answer("414 Request-URI Too Long",
                               f"Request-URI too long: the limit is {max_head} bytes\n")
        return http_answer("413 Request Entity Too Large",
                           f"Request headers too large: the limit is {max_head} bytes\n")

    def discard(self) -> Step:
        """Drop the connection's ``discard`` bytes (an unread body), buffered ones first."""
        conn = self.conn
        buffer = conn.rfile.buffer
        dropped = min(conn.discard, len(buffer))
        del buffer[:dropped]
        conn.discard -= dropped
        while conn.discard > 0:
            got = self._receive(self.scratch[:min(conn.discard, RECEIVE_SIZE)])
            if isinstance(got, Step):
                return got
            conn.discard -= got
        return Step.DISCARDED

    def start_answer(self, answer: bytes, linger_after: bool) -> None:
        """Prepare to send ``answer``, forgetting what the client sent."""
        self.phase = Phase.ANSWER
        self.outgoing = memoryview(answer)
        self.linger_after = linger_after
        self.conn.rfile.buffer.clear()

    def send(self) -> Step:
        """Send what is left of the answer."""
        while self.outgoing:
            try:
                sent = self.conn.socket.send(self.outgoing)
            except (ssl.SSLWantWriteError, BlockingIOError):
                return Step.WANT_WRITE
            except ssl.SSLWantReadError:
                return Step.WANT_READ
            except OSError:
                return Step.GONE
            self.outgoing = self.outgoing[sent:]
        return Step.SENT

    def shut(self) -> bool:
        """Shut our side (TLS close_notify, then TCP FIN); False if the connection is dead.

        From here on the socket is read as plain TCP: what arrives is discarded undecrypted.
        """
        sock = self.conn.socket
        self.conn.rfile.buffer.clear()
        if isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                sock.unwrap()  # sends close_notify; the peer's may never come
        try:
            sock.shutdown(socket.SHUT_WR)  # an SSLSocket drops its TLS state here
        except OSError:
            return False
        return True

    def drain(self) -> Step:
        """Discard what arrives until the client closes (GONE)."""
        while True:
            got = self._receive(self.scratch)
            if isinstance(got, Step):
                return got
