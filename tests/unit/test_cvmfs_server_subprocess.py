"""The streamed subprocess runner: no blocking reads, timeouts that kill the process group."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import textwrap
import time

import pytest

from publisher.repositories.cvmfs_server.subprocess_log import run_command

LOG = logging.getLogger("test.subprocess")


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


class Timed(logging.Handler):
    """Records (monotonic time, level, message) of every log record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record.levelno, record.getMessage()))


@pytest.fixture
def timed():
    handler = Timed()
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG)
    yield handler
    LOG.removeHandler(handler)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_lines_are_logged_as_they_come_not_at_exit(timed):
    started = time.monotonic()
    result = run_command(py("""
        import sys, time
        print("first", flush=True)
        time.sleep(1.0)
        print("oops", file=sys.stderr, flush=True)
    """), timeout=30, log=LOG)
    assert result.ok and result.stdout_tail == ("first",) and result.stderr_tail == ("oops",)
    (t_first, level_first, msg_first), (_, level_err, msg_err) = timed.records
    assert msg_first.endswith("] first") and level_first == logging.INFO
    assert msg_err.endswith("] oops") and level_err == logging.WARNING
    assert t_first - started < 0.8  # logged while the command was still sleeping


def test_a_partial_line_does_not_block_and_is_logged(timed):
    started = time.monotonic()
    result = run_command(py("""
        import sys, time
        sys.stdout.write("Processing changes... "); sys.stdout.flush()
        time.sleep(0.5)
        sys.stdout.write("done"); sys.stdout.flush()
        time.sleep(0.5)
    """), timeout=30, log=LOG)
    assert result.ok
    assert result.stdout_tail == ("Processing changes... done",)
    assert time.monotonic() - started < 3.5


def test_a_very_long_line_is_logged_in_pieces(timed):
    result = run_command(py("import sys; sys.stdout.write('x' * 20000)"), timeout=30, log=LOG)
    assert result.ok
    assert [len(m.split("] ", 1)[1]) for _, _, m in timed.records] == [8192, 8192, 3616]


def test_lots_of_output_on_both_streams_does_not_deadlock():
    result = run_command(py("""
        import sys
        for i in range(20000):
            print("out", i)
            print("err", i, file=sys.stderr)
    """), timeout=60, log=LOG)
    assert result.ok
    assert result.stdout_tail[-1] == "out 19999" and result.stderr_tail[-1] == "err 19999"
    assert len(result.stdout_tail) == 20


def test_failure_names_command_exit_code_and_last_error_line():
    result = run_command(py("""
        import sys
        print("some progress")
        print("CernVM-FS error: it broke", file=sys.stderr)
        sys.exit(3)
    """), timeout=30, log=LOG)
    assert result.returncode == 3 and not result.ok and not result.timed_out
    assert result.describe().endswith("exited with 3: CernVM-FS error: it broke")
    assert result.describe().startswith(os.path.basename(sys.executable) + " -c ")


def test_without_stderr_the_last_stdout_line_explains():
    result = run_command(py("""
        print("Repository r is not in a transaction"); raise SystemExit(1)
    """), timeout=30, log=LOG)
    assert result.describe().endswith("exited with 1: Repository r is not in a transaction")


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild"
    started = time.monotonic()
    result = run_command(py(f"""
        import subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        print("hanging", flush=True)
        time.sleep(300)
    """), timeout=1.5, log=LOG)
    assert result.timed_out and result.returncode is None and not result.ok
    assert time.monotonic() - started < 15
    assert "timed out after 1.5 s and was killed: hanging" in result.describe()
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_command_ignoring_sigterm_is_killed(tmp_path):
    result = run_command(py("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stubborn", flush=True)
        time.sleep(300)
    """), timeout=1, log=LOG)
    assert result.timed_out


def test_exit_while_a_helper_holds_the_pipes_does_not_wait_for_the_helper(tmp_path):
    started = time.monotonic()
    result = run_command(py("""
        import subprocess
        subprocess.Popen(["sleep", "4"])  # inherits stdout/stderr
        print("bye")
    """), timeout=60, log=LOG)
    assert result.ok and result.stdout_tail == ("bye",)
    assert time.monotonic() - started < 3.5


def test_stdin_is_fed_from_chunks_while_output_is_read():
    chunks = [os.urandom(65536) for _ in range(64)]  # 4 MiB: more than a pipe holds
    result = run_command(py("""
        import hashlib, sys
        h = hashlib.sha256()
        while True:
            data = sys.stdin.buffer.read(1 << 16)
            if not data:
                break
            h.update(data)
            print("read", len(data))
        print(h.hexdigest())
    """), timeout=60, log=LOG, stdin=iter(chunks))
    assert result.ok
    assert result.stdout_tail[-1] == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_an_error_in_the_stdin_chunks_kills_the_command_and_propagates():
    def chunks():
        yield b"x" * 1000
        raise ValueError("bad tarball")

    started = time.monotonic()
    with pytest.raises(ValueError, match="bad tarball"):
        run_command(py("import sys, time; sys.stdin.read(); time.sleep(300)"),
                    timeout=60, log=LOG, stdin=chunks())
    assert time.monotonic() - started < 15


def test_stdin_is_closed_when_not_fed():
    result = run_command(py("import sys; print(repr(sys.stdin.read()))"), timeout=30, log=LOG)
    assert result.stdout_tail == ("''",)  # a prompt (abort without -f) cannot hang


def test_a_missing_program_raises_oserror():
    with pytest.raises(FileNotFoundError):
        run_command(["/nonexistent/cvmfs_server", "publish", "r"], timeout=5, log=LOG)


def test_stderr_level_can_be_lowered_for_expected_answers(timed):
    run_command(py("import sys; print('not in a transaction', file=sys.stderr)"), timeout=30,
                log=LOG, stderr_level=logging.INFO)
    assert [level for _, level, _ in timed.records] == [logging.INFO]
