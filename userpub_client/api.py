"""The HTTP(S) client of ``/pubapi/*`` with failover between servers (standard library only).

Servers come from ``--server``, ``$USERPUB_SERVERS`` or ``$JOBSUB_DROPBOX_SERVER_LIST``. The
list is shuffled once; the client stays on one server while it answers (so ``exists`` and the
following ``publish`` go to the same server, as jobsub_lite PR #520 asks) and moves to the
next one on a connection error, a timeout, a 5xx/507, a 408 or a 429. The first retry is
immediate (on the other server), later ones back off exponentially with jitter, honouring a
``Retry-After``. Other 4xx answers are final, and so is a server whose name does not resolve
or whose certificate fails verification: it is left out at once, never retried. Uploads stream
from the file with a Content-Length and ``Expect: 100-continue``, so a server that refuses at
once (403, 413, 507) costs no upload. The client certificate is the proxy file itself (cert, key, user cert).
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from userpub_client import __version__
from userpub_client.credentials import Credentials
from userpub_client.progress import Progress

DEFAULT_PORTS = {"https": 443, "http": 80}
SERVER_ENV = ("USERPUB_SERVERS", "JOBSUB_DROPBOX_SERVER_LIST")
CHUNK = 1 << 20
MAX_ANSWER = 64 << 10
ANSWERS = ("PRESENT", "MISSING", "QUEUED", "PUBLISHING", "FAILED", "OK")


class ClientError(Exception):
    """A problem on the client's side (e.g. a bad server address); ``str()`` says what."""


class ApiError(Exception):
    """The servers did not give a usable answer."""


class RefusedError(ApiError):
    """A final 4xx answer: bad request, not allowed, too large... (never retried)."""

    def __init__(self, server: Server, status: int, reason: str) -> None:
        super().__init__(f"{server} answered {status}: {reason or http.client.responses.get(status, '')}")
        self.server, self.status, self.reason = server, status, reason


class UnavailableError(ApiError):
    """Every attempt failed with a retriable error; ``errors`` lists them, oldest first."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__(f"no server could answer after {len(errors)} attempts; last: {errors[-1]}")
        self.errors = tuple(errors)


class UnreachableError(ApiError):
    """Every server failed with an error that retrying cannot fix (its name does not
    resolve, its certificate is not trusted); ``errors`` lists them."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors) if len(errors) > 1 else errors[0])
        self.errors = tuple(errors)


# -- servers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One ingest server: scheme, host, port and an optional path before ``/pubapi``."""

    scheme: str
    host: str
    port: int
    base: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base}"

    @property
    def is_loopback(self) -> bool:
        """True for localhost and loopback addresses."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_server(spec: str) -> Server:
    """``host``, ``host:port``, ``[v6]:port`` (HTTPS, port 443) or an http(s) URL."""
    text = spec.strip()
    url = text if "://" in text else f"https://{text}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ClientError(f"bad server {spec!r}: {err}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ClientError(f"bad server {spec!r}: expected host[:port] or an http(s):// URL")
    if parts.query or parts.fragment or parts.username:
        raise ClientError(f"bad server {spec!r}: no user, query or fragment allowed")
    try:
        parts.hostname.encode("idna")  # what the socket layer does first: an empty label...
    except UnicodeError:
        raise ClientError(f"bad server {spec!r}: {parts.hostname!r} is not a host name"
                          ) from None
    base = parts.path.rstrip("/").removesuffix("/pubapi")
    return Server(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme], base)


def parse_server_list(text: str) -> list[Server]:
    """A comma- and/or space-separated list of servers (duplicates dropped, order kept)."""
    servers: list[Server] = []
    for spec in re.split(r"[,\s]+", text):
        if spec and (server := parse_server(spec)) not in servers:
            servers.append(server)
    return servers


def servers_from(options: Sequence[str], env: Mapping[str, str]) -> list[Server]:
    """``--server`` values, else ``$USERPUB_SERVERS``, else ``$JOBSUB_DROPBOX_SERVER_LIST``."""
    if options:
        return parse_server_list(" ".join(options))
    for name in SERVER_ENV:
        if env.get(name, "").strip():
            return parse_server_list(env[name])
    raise ClientError("no server given: use --server HOST[:PORT] or set USERPUB_SERVERS")


# -- answers and progress ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A parsed answer line: ``state`` (PRESENT, MISSING, QUEUED, ...) and its detail."""

    state: str
    detail: str
    server: Server


def parse_answer(text: str, server: Server) -> Answer:
    """``PRESENT:<path>``, ``FAILED:<reason>``, ``QUEUED``...; ApiError on anything else."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    state, _, detail = line.partition(":")
    if state not in ANSWERS:
        raise ApiError(f"{server} gave an unexpected answer: {line[:200]!r}")
    return Answer(state, detail.strip(), server)


# -- the API ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all; retry 1 is immediate, retry n waits ~base*2**(n-2), at most max."""

    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, retry: int, rng: random.Random, retry_after: float = 0.0) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...)."""
        wait = 0.0 if retry <= 1 else min(self.max_delay, self.base_delay * 2 ** (retry - 2))
        wait *= rng.uniform(0.5, 1.0)
        return min(self.max_delay, max(wait, retry_after))


#: The original's answer of a server that cannot take requests now: another server may.
NOT_RUNNING = "Bad request: Service not running"


def retriable(status: int) -> bool:
    """5xx (507 included), 408 and 429 are worth another try, elsewhere or later."""
    return status >= 500 or status in (408, 429)


@dataclass
class PubApi:
    """A session with the servers: sticky on the current one, failing over on errors."""

    servers: Sequence[Server]
    context: ssl.SSLContext
    credentials: Credentials
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], None] = time.sleep
    log: Callable[[str], None] = lambda _msg: None
    timeout: float = 60.0
    continue_wait: float = 3.0
    _order: list[Server] = field(init=False)

    def __post_init__(self) -> None:
        if not self.servers:
            raise ClientError("no server to talk to")
        self._order = list(self.servers)
        self.rng.shuffle(self._order)

    @property
    def current(self) -> Server:
        """The server the next request goes to first."""
        return self._order[0]

    def _switch(self) -> None:
        self._order.append(self._order.pop(0))

    def call(self, method: str, endpoint: str, cid: str | None = None, *,
             upload: Path | None = None, progress: Progress | None = None) -> Answer:
        """One API call with failover and backoff; the parsed answer of a 2xx reply."""
        server, text = self.request(method, endpoint, cid, upload=upload, progress=progress)
        return parse_answer(text, server)

    def request(self, method: str, endpoint: str, cid: str | None = None, *,
                upload: Path | None = None, progress: Progress | None = None
                ) -> tuple[Server, str]:
        """One API call with failover and backoff: (server, body) of a 2xx reply."""
        errors: list[str] = []  # retriable failures: each one counts as an attempt
        permanent: list[str] = []  # servers left out for good
        retry_after = 0.0
        attempt = 0
        retry_due = False
        while attempt < max(1, self.policy.attempts):
            if not self._order:
                raise UnreachableError(permanent)
            if retry_due:
                retry_due = False
                if len(self._order) > 1:
                    self._switch()
                wait = self.policy.delay(attempt, self.rng, retry_after)
                self.log(f"{errors[-1]}; retrying on {self.current}"
                         + (f" in {wait:.0f} s" if wait >= 1 else ""))
                self.sleep(wait)
            server = self.current
            try:
                status, text, retry_after = self._once(server, method, endpoint, cid, upload,
                                                       progress)
            except (OSError, http.client.HTTPException) as err:
                if _is_permanent(err):  # the same answer every time: drop this server
                    permanent.append(f"{server}: {_describe(err)}")
                    self._order.remove(server)
                    if self._order:
                        self.log(f"{permanent[-1]}; not retrying it, trying {self.current}")
                    continue
                errors.append(f"{server}: {_describe(err)}")
                retry_after = 0.0
                attempt, retry_due = attempt + 1, True
                continue
            if 200 <= status < 300:
                return server, text
            reason = text.strip().splitlines()[0][:300] if text.strip() else ""
            if not retriable(status) and reason != NOT_RUNNING:
                raise RefusedError(server, status, reason)
            errors.append(f"{server} answered {status}: {reason}")
            attempt, retry_due = attempt + 1, True
        raise UnavailableError(errors)

    def _once(self, server: Server, method: str, endpoint: str, cid: str | None,
              upload: Path | None, progress: Progress | None) -> tuple[int, str, float]:
        conn: http.client.HTTPConnection
        if server.scheme == "https":
            conn = http.client.HTTPSConnection(server.host, server.port, context=self.context,
                                               timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=self.timeout)
        url = f"{server.base}/pubapi/{endpoint}"
        if cid is not None:
            url += "?cid=" + urllib.parse.quote(cid, safe="")
        headers = {"User-Agent": f"userpub-client/{__version__}", "Accept": "text/plain"}
        if self.credentials.token and (server.scheme == "https" or server.is_loopback):
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        try:
            if upload is None:
                conn.request(method, url, headers=headers)
            else:
                with upload.open("rb") as body:
                    try:
                        early = _send_file(conn, url, headers, body, progress,
                                           self.continue_wait)
                        if early is not None:
                            return early
                    except OSError as err:
                        # The server may have answered early (403, 413) and closed: that
                        # answer is worth more than the broken pipe, if it can be read.
                        try:
                            response = conn.getresponse()
                        except (OSError, http.client.HTTPException):
                            raise err from None
                        text = response.read(MAX_ANSWER).decode("utf-8", "replace")
                        return response.status, text, 0.0
            response = conn.getresponse()
            text = response.read(MAX_ANSWER).decode("utf-8", "replace")
            return response.status, text, _retry_after(response.getheader("Retry-After"))
        finally:
            conn.close()

    def exists(self, cid: str) -> Answer:
        """``PRESENT:<path>`` or ``MISSING``."""
        return self._expect(self.call("GET", "exists", cid), "PRESENT", "MISSING")

    def update(self, cid: str) -> Answer:
        """Like exists; the server also refreshes the CID's timestamp when present."""
        return self._expect(self.call("GET", "update", cid), "PRESENT", "MISSING")

    def status(self, cid: str) -> Answer:
        """QUEUED, PUBLISHING, PRESENT, FAILED or MISSING."""
        return self._expect(self.call("GET", "status", cid),
                            "QUEUED", "PUBLISHING", "PRESENT", "FAILED", "MISSING")

    def publish(self, tarball: Path, cid: str, progress: Progress | None = None) -> Answer:
        """Upload ``tarball`` as ``cid``: ``OK`` (queued) or ``PRESENT:<path>``."""
        answer = self.call("POST", "publish", cid, upload=tarball, progress=progress)
        return self._expect(answer, "OK", "PRESENT")

    def config(self) -> list[str]:
        """The repositories served (``repos:a,b``)."""
        server, text = self.request("GET", "config")
        text = text.strip()
        if not text.startswith("repos:"):
            raise ApiError(f"{server} gave an unexpected config answer: {text[:200]!r}")
        return [r for r in text.removeprefix("repos:").split(",") if r]

    def ping(self) -> str:
        """``OK`` when the server is up."""
        return self.call("GET", "ping").state

    @staticmethod
    def _expect(answer: Answer, *states: str) -> Answer:
        if answer.state not in states:
            raise ApiError(f"{answer.server} gave an unexpected answer: {answer.state}")
        return answer


def _send_file(conn: http.client.HTTPConnection, url: str, headers: dict[str, str],
               body: BinaryIO, progress: Progress | None, continue_wait: float
               ) -> tuple[int, str, float] | None:
    """Send the request head with ``Expect: 100-continue``, then the body unless the server
    answers first (403, 413, 507...): that answer is returned and nothing is uploaded."""
    size = body.seek(0, 2)
    body.seek(0)
    conn.putrequest("POST", url, skip_accept_encoding=True)
    for name, value in {**headers, "Content-Type": "application/octet-stream",
                        "Content-Length": str(size), "Expect": "100-continue"}.items():
        conn.putheader(name, value)
    conn.endheaders()
    if conn.sock is not None and (early := _early_answer(conn.sock, continue_wait)):
        return early
    if progress is not None:
        progress.reset()
    try:
        while chunk := body.read(CHUNK):
            conn.send(chunk)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        if progress is not None:
            progress.finish()
    return None


def _early_answer(sock: socket.socket, wait: float) -> tuple[int, str, float] | None:
    """None after ``100 Continue`` or ``wait`` s of silence; else the final answer, read here
    because http.client cannot read a response before the body is sent."""
    saved = sock.gettimeout()
    sock.settimeout(wait)
    try:
        first = sock.recv(1)
    except TimeoutError:
        return None
    finally:
        sock.settimeout(saved)
    head = bytearray(first)
    while first and not head.endswith(b"\r\n\r\n") and len(head) < MAX_ANSWER:
        first = sock.recv(1)
        head += first
    if not first:
        raise http.client.RemoteDisconnected("the server closed the connection")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise http.client.BadStatusLine(lines[0])
    status = int(parts[1])
    if status == 100:
        return None
    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(fields.get("content-length", "0")) if fields.get("content-length", "").isdigit() \
        else MAX_ANSWER
    text = bytearray()
    while len(text) < min(length, MAX_ANSWER) and (chunk := sock.recv(min(length, MAX_ANSWER)
                                                                      - len(text))):
        text += chunk
    return status, text.decode("utf-8", "replace"), _retry_after(fields.get("retry-after"))


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _is_permanent(err: BaseException) -> bool:
    """A name that does not resolve or a certificate that fails verification: retrying, here
    or later, gives the same answer (a temporary DNS failure, EAI_AGAIN, is retried)."""
    if isinstance(err, socket.gaierror):
        return err.errno != socket.EAI_AGAIN
    return isinstance(err, ssl.SSLCertVerificationError)


def _describe(err: BaseException) -> str:
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the server's name: {err.strerror or err}"
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS: {err.verify_message or err} (is the CA in $X509_CERT_DIR or "
                "$USERPUB_CA_BUNDLE?)")
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
