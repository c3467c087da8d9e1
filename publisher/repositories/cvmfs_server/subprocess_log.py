"""Run an external command (no shell) and stream its output into our log, line by line.

The original cvmfs-user-pub once hung because it read a subcommand's output with blocking
reads that waited for an end of line ("publishes getting stuck", v1.7). Here one loop
watches stdout and stderr with a selector on non-blocking pipes: a line is logged as soon
as it is complete, a partial line is logged when it grows long or when the stream ends,
and no read ever waits for a newline. The same loop can feed the command's stdin from an
iterator of chunks (``cvmfs_server ingest -t -``).

Every command runs in its own process group (session) with ``cwd=/`` and stdin closed
unless fed. On timeout the whole group gets SIGTERM, then SIGKILL after a grace period,
so helpers the command started die with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

_READ_SIZE = 65536
_LONG_LINE = 8192  # a partial line this long is logged without waiting for its newline
_TAIL_LINES = 20
_EXIT_GRACE = 2.0  # seconds to keep reading after the command exited (pipes held by others)
_KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of the process group


@dataclass(frozen=True)
class CommandResult:
    """How a command ended, with the last lines it wrote."""

    argv: tuple[str, ...]
    returncode: int | None  # None: killed after a timeout
    stdout_tail: tuple[str, ...]
    stderr_tail: tuple[str, ...]
    seconds: float
    timeout: float

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.returncode == 0

    @property
    def timed_out(self) -> bool:
        """True when the command was killed because it ran too long."""
        return self.returncode is None

    @property
    def command(self) -> str:
        """The command as an operator would type it (program without its directory)."""
        return " ".join([os.path.basename(self.argv[0]), *self.argv[1:]])

    def last_line(self) -> str:
        """The last non-empty stderr line, else the last stdout line, else ''."""
        for tail in (self.stderr_tail, self.stdout_tail):
            for line in reversed(tail):
                if line.strip():
                    return line.strip()
        return ""

    def output(self) -> str:
        """Both tails, for matching messages."""
        return "\n".join(self.stdout_tail + self.stderr_tail)

    def describe(self) -> str:
        """``cvmfs_server publish repo1 exited with 3: <last line>`` (or timed out)."""
        if self.timed_out:
            what = f"{self.command} timed out after {self.timeout:g} s and was killed"
        else:
            what = f"{self.command} exited with {self.returncode}"
        line = self.last_line()
        return f"{what}: {line}" if line else what


class _Stream:
    """One output pipe: a byte buffer cut into logged lines, and a tail of recent lines."""

    def __init__(self, fd: int, level: int, prefix: str, log: logging.Logger) -> None:
        self.fd = fd
        self.level = level
        self.prefix = prefix
        self.log = log
        self.buffer = bytearray()
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            cut = self.buffer.find(b"\n")
            if cut < 0:
                if len(self.buffer) >= _LONG_LINE:
                    self._emit(bytes(self.buffer[:_LONG_LINE]))
                    del self.buffer[:_LONG_LINE]
                    continue
                return
            self._emit(bytes(self.buffer[:cut]))
            del self.buffer[:cut + 1]

    def flush(self) -> None:
        if self.buffer:
            self._emit(bytes(self.buffer))
            self.buffer.clear()

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(line)
        self.log.log(self.level, "[%s] %s", self.prefix, line)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's process group, SIGKILL it if still alive after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(_KILL_GRACE)
        except subprocess.TimeoutExpired:
            continue
        break
    with contextlib.suppress(ProcessLookupError):  # helpers that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    log: logging.Logger,
    stdin: Iterable[bytes] | None = None,
    cwd: str = "/",
    env: dict[str, str] | None = None,
    stderr_level: int = logging.WARNING,
) -> CommandResult:
    """Run ``argv`` to completion (or ``timeout``), logging stdout (INFO) and stderr
    (``stderr_level``).

    ``stdin``, when given, is an iterable of chunks written to the command's stdin as it
    accepts them; an exception raised by the iterable kills the command and propagates.
    OSError (e.g. the program does not exist) propagates from the start.
    """
    prefix = " ".join([os.path.basename(argv[0]), *argv[1:]])
    started = time.monotonic()
    deadline = started + timeout
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
        start_new_session=True, close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    streams = [_Stream(proc.stdout.fileno(), logging.INFO, prefix, log),
               _Stream(proc.stderr.fileno(), stderr_level, prefix, log)]
    timed_out = False
    try:
        with selectors.DefaultSelector() as sel:
            for stream in streams:
                os.set_blocking(stream.fd, False)
                sel.register(stream.fd, selectors.EVENT_READ, stream)
            feeder = _Feeder(proc, stdin, sel) if stdin is not None else None
            exited_at: float | None = None
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > _EXIT_GRACE:
                    log.warning("[%s] exited, but its output pipes are still held open; "
                                "not waiting for them", prefix)
                    break
                for key, _ in sel.select(min(deadline - now, 0.5)):
                    if key.data is None:
                        assert feeder is not None
                        feeder.write()
                        continue
                    stream = key.data
                    try:
                        data = os.read(stream.fd, _READ_SIZE)
                    except BlockingIOError:
                        continue
                    if data:
                        stream.feed(data)
                    else:
                        sel.unregister(stream.fd)
            if not timed_out:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        for stream in streams:
            stream.flush()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if timed_out:
        log.error("[%s] still running after %g s; killing its process group", prefix, timeout)
        _kill_group(proc)
    return CommandResult(tuple(argv), None if timed_out else proc.returncode,
                         tuple(streams[0].tail), tuple(streams[1].tail),
                         time.monotonic() - started, timeout)


class _Feeder:
    """Writes chunks from an iterable to the command's non-blocking stdin as it drains."""

    def __init__(self, proc: subprocess.Popen[bytes], chunks: Iterable[bytes],
                 sel: selectors.BaseSelector) -> None:
        assert proc.stdin is not None
        self.pipe = proc.stdin
        self.fd = proc.stdin.fileno()
        self.chunks: Iterator[bytes] = iter(chunks)
        self.pending = memoryview(b"")
        self.sel = sel
        os.set_blocking(self.fd, False)
        sel.register(self.fd, selectors.EVENT_WRITE, None)

    def write(self) -> None:
        """Write what the pipe accepts now; close stdin at the end of the chunks."""
        while True:
            if not self.pending:
                chunk = next(self.chunks, None)
                if chunk is None:
                    self._close()
                    return
                self.pending = memoryview(chunk)
                continue
            try:
                written = os.write(self.fd, self.pending)
            except BlockingIOError:
                return
            except BrokenPipeError:  # the command stopped reading; its exit status tells why
                self._close()
                return
            self.pending = self.pending[written:]

    def _close(self) -> None:
        self.sel.unregister(self.fd)
        self.pipe.close()
