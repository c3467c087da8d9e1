"""Test-side handle on the cvmfs_server test double (the executable next to this file).

The double is NOT cvmfs_server; see README.md. Tests put this directory first on PATH and
point ``CVMFS_SERVER_DOUBLE_ROOT`` at a scratch directory; the backend then finds the
double as ``cvmfs_server`` on PATH, exactly as it finds the real one on a stratum 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

DOUBLE_DIR = Path(__file__).resolve().parent
EXECUTABLE = DOUBLE_DIR / "cvmfs_server"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mounts_available() -> str | None:
    """None when this process may bind-mount and mount overlayfs; else why not."""
    if os.geteuid() != 0:
        return "the cvmfs_server double needs root (it uses bind and overlay mounts)"
    probe = Path(f"/tmp/.cvmfs-double-probe-{uuid.uuid4().hex}")
    dirs = [probe / d for d in ("lower", "upper", "work", "mnt")]
    try:
        for d in dirs:
            d.mkdir(parents=True)
        lower, upper, work, mnt = (str(d) for d in dirs)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, mnt],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"overlay mounts are not permitted here: {proc.stderr.strip()}"
        subprocess.run(["umount", mnt], check=True)
        return None
    except (OSError, subprocess.CalledProcessError) as err:
        return f"mounts are not permitted here: {err}"
    finally:
        subprocess.run(["rm", "-rf", str(probe)], check=False)


class CvmfsServerDouble:
    """One double "host": its root directory, its repositories, faults and command log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "faults").mkdir(exist_ok=True)
        self.repos: list[str] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment in which ``cvmfs_server`` is the double."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{DOUBLE_DIR}:{env.get('PATH', '')}:{SYSTEM_PATH}"
        env["CVMFS_SERVER_DOUBLE_ROOT"] = str(self.root)
        return env

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the double directly (as an operator would run cvmfs_server)."""
        return subprocess.run([str(EXECUTABLE), *args], capture_output=True, text=True,
                              env=self.env(), cwd="/", check=False, input=stdin,
                              stdin=subprocess.DEVNULL if stdin is None else None)

    def mkfs(self, name: str, *, gc: bool = True) -> None:
        """Create a repository (``-z``: garbage collection enabled)."""
        proc = self.run("mkfs", *(["-z"] if gc else []), "-o", "root", name)
        assert proc.returncode == 0, proc.stderr
        self.repos.append(name)

    def destroy(self) -> None:
        """Unmount and remove every repository (also after a failed test)."""
        for name in self.repos:
            self.run("rmfs", "-f", name)
        self.repos.clear()
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        leftovers = [line.split()[1] for line in mounts
                     if line.split()[1].startswith(str(self.root) + "/")]
        for path in sorted(leftovers, key=len, reverse=True):
            subprocess.run(["umount", "-l", path], check=False)

    # -- where things are ----------------------------------------------------------------

    def mount(self, name: str) -> Path:
        """The union mount (``/cvmfs/<repo>`` of a real host)."""
        return self.root / "cvmfs" / name

    def published(self, name: str) -> Path:
        """The read-only view of the published revision (``.../rdonly``)."""
        return self.root / "var/spool/cvmfs" / name / "rdonly"

    def in_transaction(self, name: str) -> bool:
        """True while the repository has an open transaction."""
        return (self.root / "var/spool/cvmfs" / name / "in_transaction").exists()

    def revision(self, name: str) -> int:
        """The number of publishes so far."""
        state = self.root / "var/spool/cvmfs" / name / "double.json"
        return int(json.loads(state.read_text())["revision"])

    # -- faults and the command log --------------------------------------------------------

    def fail(self, command: str, *, exit: int | None = 1, stderr: str = "", stdout: str = "",
             times: int = -1, hang: float = 0, repo: str | None = None) -> None:
        """Make ``command`` fail (``times`` times; -1: always), optionally hanging first."""
        fault: dict[str, object] = {"times": times}
        if exit is not None:
            fault["exit"] = exit
        for key, value in (("stderr", stderr), ("stdout", stdout), ("hang", hang),
                           ("repo", repo)):
            if value:
                fault[key] = value
        (self.root / "faults" / f"{command}.json").write_text(json.dumps(fault))

    def clear_faults(self) -> None:
        """Let every command work again."""
        for path in (self.root / "faults").glob("*.json"):
            path.unlink()

    def commands(self, repo: str | None = None) -> list[tuple[str, int]]:
        """Finished calls as ``("publish repo1", exit code)``, oldest first."""
        log = self.root / "commands.log"
        out: list[tuple[str, int]] = []
        for line in log.read_text().splitlines() if log.exists() else []:
            event = json.loads(line)
            if event["event"] != "exit":
                continue
            argv = event["argv"]
            if repo is None or repo in argv:
                out.append((" ".join(argv), event["code"]))
        return out

    def started(self) -> list[str]:
        """Every call started (including those killed before they finished)."""
        log = self.root / "commands.log"
        return [" ".join(e["argv"]) for e in map(json.loads, log.read_text().splitlines())
                if e["event"] == "start"] if log.exists() else []

    def hung_pids(self) -> list[int]:
        """Pids of the sleeping children that "hang" faults started."""
        path = self.root / "hung.pids"
        return [int(line.split()[1]) for line in path.read_text().splitlines()] \
            if path.exists() else []
