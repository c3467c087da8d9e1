"""Shared test helpers: configurations, tarballs and real daemon processes."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from userpub.config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_config(directory: Path, repos: int = 2, *, server: str = "pub1",
                 extra: str = "", repo_extra: str = "", hosts: Mapping[int, str] | None = None,
                 rescan: float = 1.0, backend: str = "local") -> Path:
    """Write a configuration with ``repos`` repositories under ``directory``.

    ``backend="cvmfs-server"``: the repositories of the cvmfs_server test double rooted at
    ``directory / "double"`` (see :func:`cvmfs_double_root`): ``mount`` is its union
    mount, ``root`` its read-only view of the published revision. Otherwise each root
    (``repos/repo<i>``) is made here, as an operator makes it: the publisher never does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    blocks = []
    for i in range(repos):
        host = (hosts or {}).get(i, server)
        name = f"repo{i + 1}.example.org"
        if backend == "cvmfs-server":
            double = cvmfs_double_root(directory)
            where = (f'root = "{double}/var/spool/cvmfs/{name}/rdonly"\n'
                     f'mount = "{double}/cvmfs/{name}"')
        else:
            where = f'root = "repos/repo{i + 1}"\nmount = "/cvmfs/{name}"'
            (directory / "repos" / f"repo{i + 1}").mkdir(parents=True, exist_ok=True)
        blocks.append(f"""
[[repository]]
name = "{name}"
host = "{host}"
backend = "{backend}"
{where}
{repo_extra}""")
    text = f"""
[server]
name = "{server}"
spool = "spool"
state = "state"

[publisher]
rescan_seconds = {rescan}
durable = false

[metrics]
publisher_listen = "127.0.0.1:0"
janitor_listen = "127.0.0.1:0"
replicator_listen = "127.0.0.1:0"
{extra}
""" + "".join(blocks)
    path = directory / "userpub.toml"
    path.write_text(text)
    return path


def cvmfs_double_root(directory: Path) -> Path:
    """Where :func:`write_config` puts the cvmfs_server test double's host for ``directory``."""
    return directory.resolve() / "double"


def make_tarball(path: Path, files: Mapping[str, bytes], mode: str = "w:gz") -> Path:
    """A tarball holding ``files`` (name -> content); directories are implied."""
    with tarfile.open(path, mode) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def userpub_cmd(config: Path, *args: str) -> list[str]:
    """The argv of a ``userpub`` command run with this interpreter."""
    return [sys.executable, "-m", "userpub", "--config", str(config), *args]


def run_userpub(config: Path, *args: str, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a ``userpub`` command to completion."""
    return subprocess.run(userpub_cmd(config, *args), capture_output=True, text=True,
                          check=check, timeout=timeout, cwd=REPO_ROOT)


class Daemon:
    """A real daemon subprocess whose log goes to a file."""

    def __init__(self, config: Path, *args: str, log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(userpub_cmd(config, *args), stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appears in the log (fail on timeout or exit)."""
        wait_for(lambda: text in self.log(), timeout,
                 lambda: f"{text!r} not logged; exit={self.proc.poll()}\n{self.log()}")

    def kill(self) -> None:
        """kill -9."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code


def wait_for(predicate: Callable[[], object], timeout: float = 30,
             message: Callable[[], str] | str = "condition not met", interval: float = 0.02
             ) -> None:
    """Poll ``predicate`` until true; AssertionError with ``message`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(message() if callable(message) else message)


def tree_listing(root: Path) -> dict[str, bytes | str]:
    """Relative path -> content (files) or link target (symlinks) or 'dir'."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = full.read_bytes()
    return out


@contextlib.contextmanager
def publishers_alive(config: Config) -> Iterator[None]:
    """Hold every hosted repository's lifetime lock, as running publishers do (for tests of
    the ingest alone, whose ping answers OK only while a publisher runs)."""
    from filelock import FileLock

    from userpub.locks import lock_path

    config.lock_dir.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(lock_path(config, repo.name)) for repo in config.hosted]
    for lock in locks:
        lock.acquire(timeout=10)
    try:
        yield
    finally:
        for lock in locks:
            lock.release()


def tar_body(size: int, seed: int = 0) -> bytes:
    """A valid uncompressed tarball of exactly ``size`` bytes (at least 1024): one member of
    random bytes when there is room, the end-of-archive marker, then zeros (all allowed)."""
    import random

    if size < 1024:
        raise ValueError("a tarball has at least 1024 bytes (the end-of-archive marker)")
    data_size = (size - 512 - 1024) // 512 * 512
    if data_size <= 0:
        return bytes(size)  # all zeros: an empty archive
    info = tarfile.TarInfo("payload.bin")
    info.size, info.mtime, info.mode = data_size, 1_700_000_000, 0o644
    out = info.tobuf(tarfile.USTAR_FORMAT) + random.Random(seed).randbytes(data_size)
    return out + bytes(size - len(out))
