"""Support for the hostile-world tests (no tests here).

* :func:`tune` -- change keys of a section of a configuration written by ``write_config``.
* :class:`IngestDaemon` -- ``userpub ingest --ready-file`` as a real process.
* :class:`Api` -- the publication API called the way jobsub_lite calls it.
* :class:`CidWatcher` -- a reader thread that lists every visible CID over and over and
  records any CID seen with other contents than its tarball's (a partial CID).
* :func:`leftovers` -- what a crash may leave behind and must not stay for good.
* :class:`Failpoint` -- stops a running process at its next call of one system call (strace's
  delay injection): kill -9 at an exact point, without test hooks in the production code.
* :func:`tmpfs` -- a small tmpfs mounted on a directory (skips where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from publisher.repositories.tree import CATALOG_MARKER, PUBLISHER_RECORD
from tests.helpers import Daemon, make_tarball, wait_for
from tests.pki import TestPKI
from tests.requirements import machine_skip, tool
from tests.requirements import root as needs_root
from userpub.config import Config

REPO1, REPO2 = "repo1.example.org", "repo2.example.org"
MIB = 1 << 20


def tune(path: Path, section: str, **values: object) -> None:
    """Set ``values`` in ``[section]`` of the TOML file ``path`` (the section is added if
    missing; keys already there are replaced)."""
    text = path.read_text()
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    header = f"[{section}]\n"
    if header not in text:
        path.write_text(text.rstrip("\n") + "\n\n" + header + "\n".join(lines) + "\n")
        return
    head, _, rest = text.partition(header)
    body, sep, tail = rest.partition("\n[")
    kept = [line for line in body.splitlines()
            if line.split("=", 1)[0].strip() not in values]
    path.write_text(head + header + "\n".join(lines + kept) + "\n" + (sep + tail if sep else ""))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class IngestDaemon(Daemon):
    """``userpub ingest --ready-file F`` as a real process; ``https``/``http`` from F."""

    def __init__(self, config: Path, log: Path, timeout: float = 30) -> None:
        self.ready_file = log.with_suffix(".ready")
        self.ready_file.unlink(missing_ok=True)
        super().__init__(config, "ingest", "--ready-file", str(self.ready_file), log=log)
        wait_for(lambda: self.ready_file.exists() or self.proc.poll() is not None, timeout,
                 lambda: f"ingest not ready\n{self.log()}")
        if not self.ready_file.exists():
            raise AssertionError(f"ingest exited with {self.proc.returncode}\n{self.log()}")
        ready = json.loads(self.ready_file.read_text())
        self.https: str = ready["https"]
        self.http: str | None = ready["http"]


class Api:
    """The publication API as jobsub_lite calls it: requests, the proxy as cert and key."""

    def __init__(self, https: str, pki: TestPKI, cred: str = "proxy") -> None:
        self.base = f"https://{https}"
        self.host, _, port = https.rpartition(":")
        self.port = int(port)
        self.pki = pki
        self.cert, self.verify = pki.cert(cred), str(pki.ca_file)

    def get(self, route: str, cid: str, timeout: float = 30) -> requests.Response:
        return requests.get(f"{self.base}/pubapi/{route}", params={"cid": cid}, cert=self.cert,
                            verify=self.verify, timeout=timeout)

    def text(self, route: str, cid: str) -> str:
        """The answer of a GET route, which must be a 200."""
        r = self.get(route, cid)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.text

    def publish(self, cid: str, data: Any, timeout: float = 120) -> requests.Response:
        return requests.post(f"{self.base}/pubapi/publish", params={"cid": cid}, data=data,
                             cert=self.cert, verify=self.verify, timeout=timeout)

    def ping(self) -> bool:
        """True when the server answers a ping over HTTPS."""
        try:
            r = requests.get(f"{self.base}/pubapi/ping", verify=self.verify, timeout=10)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.text == "OK\n"

    def connect(self, timeout: float = 30) -> ssl.SSLSocket:
        """A TLS connection with the proxy as client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
        ctx.load_cert_chain(self.pki["proxy"])
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    def raw(self, request: bytes, timeout: float = 30, *, until_close: bool = False) -> bytes:
        """Send ``request`` as it is over TLS and return the first whole answer (all answers
        until the server closes, with ``until_close``); b"" if the connection just ended."""
        with self.connect(timeout) as tls:
            tls.sendall(request)
            out = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (until_close or not _complete(out)):
                try:
                    chunk = tls.recv(65536)
                except (TimeoutError, ssl.SSLError, ConnectionError):
                    break
                if not chunk:
                    break
                out += chunk
            return out


def _complete(answer: bytes) -> bool:
    """True when ``answer`` holds a whole response (headers and Content-Length body bytes)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip() or 0)
    return True


def expected_listing(files: Mapping[str, bytes]) -> set[str]:
    """Every path a CID published from a tarball of ``files`` holds (directories too)."""
    out = {CATALOG_MARKER, PUBLISHER_RECORD}
    for name in files:
        parts = name.split("/")
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def listing(root: Path) -> set[str]:
    """Relative paths of everything under ``root``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def visible_cids(cid_dir: Path) -> list[str]:
    """CID directories under ``<root>/sw`` (``x`` or ``group/x``; a CID has a publisher
    record, a group has none)."""
    out = []
    try:
        first = sorted(os.listdir(cid_dir))
    except FileNotFoundError:
        return []
    for name in first:
        if name.startswith("."):
            continue
        path = cid_dir / name
        if os.path.lexists(path / PUBLISHER_RECORD):
            out.append(name)
            continue
        with contextlib.suppress(OSError):
            out += [f"{name}/{c}" for c in sorted(os.listdir(path)) if not c.startswith(".")]
    return out


class CidWatcher(threading.Thread):
    """Lists every CID of ``roots`` over and over; a CID whose listing differs from
    ``expected(cid)`` while it stays in place is a partial CID seen by a reader.

    A CID removed (renamed away) while being listed is skipped: the reader saw it go. CIDs
    for which ``expected`` returns None are not judged.
    """

    def __init__(self, roots: list[Path],
                 expected: Callable[[str], set[str] | None]) -> None:
        super().__init__(daemon=True, name="cid-watcher")
        self.roots = roots
        self.expected = expected
        self.halt = threading.Event()
        self.scans = 0
        self.seen: set[str] = set()
        self.partial: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            for root in self.roots:
                for cid in visible_cids(root / "sw"):
                    self._check(root / "sw" / cid, cid)
            self.scans += 1

    def _check(self, path: Path, cid: str) -> None:
        want = self.expected(cid)
        if want is None:
            return
        try:
            before = os.stat(path).st_ino
        except OSError:
            return
        got = listing(path)
        try:
            after = os.stat(path).st_ino
        except OSError:
            return  # removed while listed
        if before != after:
            return
        self.seen.add(cid)
        if got != want:
            self.partial.append(f"{path}: {len(got)} of {len(want)} entries")

    def __enter__(self) -> CidWatcher:
        self.start()
        wait_for(lambda: self.scans > 0, 10, "the watcher never scanned")
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(10)

    def check(self) -> None:
        """Fail if a partial CID was ever seen."""
        assert self.scans > 1
        assert not self.partial, self.partial[:10]


def leftovers(config: Config) -> list[str]:
    """Everything a crash may leave behind: spool tmp/ and active/ entries, staging trees,
    trash, and hidden temporary files in the published trees. Empty once all is clean."""
    spool = config.server.spool
    out = [f"spool/tmp/{n}" for n in sorted(os.listdir(spool / "tmp"))]
    for name in sorted(os.listdir(spool / "active")):
        out += [f"spool/active/{name}/{n}" for n in sorted(os.listdir(spool / "active" / name))]
    for repo in config.repositories:
        root = repo.root
        assert root is not None
        for sub in (".userpub/staging", ".userpub/trash"):
            with contextlib.suppress(FileNotFoundError):
                out += [f"{repo.name}/{sub}/{n}" for n in sorted(os.listdir(root / sub))]
        sw = root / config.server.prefix
        for name in _names(sw):
            inside = [f"{name}/{c}" for c in _names(sw / name)] \
                if not (sw / name / PUBLISHER_RECORD).exists() else []
            out += [f"{repo.name}/sw/{n}" for n in [name, *inside] if n.endswith(".tmp")]
        for dirpath, _, filenames in os.walk(root / config.server.stamps):
            out += [f"{repo.name}/{os.path.relpath(os.path.join(dirpath, n), root)}"
                    for n in filenames if n.endswith(".tmp")]
    return out


def age_tmp(config: Config, seconds: float) -> list[str]:
    """Date every ``spool/tmp/`` leftover ``seconds`` back (what waiting that long would do);
    return their names."""
    tmp = config.server.spool / "tmp"
    when = time.time() - seconds
    names = sorted(os.listdir(tmp))
    for name in names:
        for path in [tmp / name, *((tmp / name).iterdir() if (tmp / name).is_dir() else [])]:
            os.utime(path, (when, when), follow_symlinks=False)
    return names


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


# -- stopping a process at an exact system call ------------------------------------------------

SYSCALLS = {"syncfs": 306, "rename": 82, "mkdir": 83, "openat": 257, "renameat2": 316,
            "write": 1, "unlinkat": 263}


class Failpoint:
    """Attach strace to ``pid`` and hold the ``when``-th call of ``syscall`` (counted from
    the attach) for a long time: the process sits at a known point until it is killed.

    Skips the test where strace is missing (Debian: ``apt install strace``), the machine is
    not x86_64, or ptrace is not permitted.
    """

    def __init__(self, pid: int, syscall: str, when: int = 1, log: Path | None = None) -> None:
        tool("strace")  # it stops a process at an exact system call
        if platform.machine() != "x86_64":
            machine_skip("the crash-point tests know x86_64 system call numbers only")
        self.pid = pid
        self.number = SYSCALLS[syscall]
        self.log = log
        argv = ["strace", "-qq", "-f", "-o", "/dev/null", "-e", f"trace={syscall}",
                "-e", f"inject={syscall}:delay_enter=600s:when={when}", "-p", str(pid)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self._attached():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.skip(f"strace cannot attach here: {err.strip()}")
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError("strace did not attach within 10 s")
            time.sleep(0.01)

    def _tasks(self) -> list[Path]:
        try:
            return list(Path(f"/proc/{self.pid}/task").iterdir())
        except FileNotFoundError:
            return []

    def _attached(self) -> bool:
        tasks = self._tasks()
        return bool(tasks) and all(_tracer(t) == self.proc.pid for t in tasks)

    def hit(self) -> bool:
        """True while some thread of the process is held at the system call."""
        for task in self._tasks():
            try:
                number = (task / "syscall").read_text().split()[0]
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if number == str(self.number) and state in ("t", "T"):
                return True
        return False

    def wait_hit(self, timeout: float = 60, why: Callable[[], str] | str = "") -> None:
        wait_for(self.hit, timeout, why or f"syscall {self.number} never reached")

    def kill(self) -> None:
        """kill -9 the held process, then detach (only then does its parent see it die)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        """Detach (a held call then proceeds, if its process is still alive)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Failpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tracer(task: Path) -> int:
    try:
        for line in (task / "status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- small filesystems ------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(directory: Path, size: str, why: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``directory`` (created); skip the test, saying ``why`` it
    needs one, where that is not allowed. Unmounted on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    needs_root(f"{why}: it mounts a {size} tmpfs")
    tool("mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(directory)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"{why}: cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def tarball_of(directory: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """``make_tarball`` into ``directory`` under ``name``."""
    directory.mkdir(parents=True, exist_ok=True)
    return make_tarball(directory / name, files)


def children(pid: int) -> dict[int, str]:
    """Child processes of ``pid``: pid -> command line."""
    out: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                    out[int(child)] = cmd.decode(errors="replace")
    return out
