"""Files of a stratum 0 directory and the atomic switch from one revision to the next.

``.cvmfspublished`` and ``.cvmfsreflog`` must change together (the manifest's ``Y`` is the
reflog's hash), but two renames are not atomic. So both names are fixed symbolic links into
``.userpub/current/``, and ``.userpub/current`` is itself a symbolic link to the generation
directory ``.userpub/gen/<revision>/``. Publishing writes a complete new generation, then
replaces ``current`` by one ``rename(2)``: a crash at any instant leaves either the old or the
new revision, each self-consistent. Web servers and readers simply follow the links.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from publisher.repositories.cvmfs_native.manifest import LetterError, Manifest, split_letter
from userpub.fsutil import fsync_dir, remove_tree, syncfs

MANIFEST = ".cvmfspublished"
REFLOG = ".cvmfsreflog"
WHITELIST = ".cvmfswhitelist"
REPLICA = ".cvmfs_master_replica"
STATUS = ".cvmfs_status.json"
WORK = ".userpub"
REPLICA_TEXT = "This file marks the repository as replicatable to stratum 1 servers\n"


@dataclass(frozen=True)
class Layout:
    """Paths of one stratum 0 directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        """``.cvmfspublished`` (a link into the current generation)."""
        return self.root / MANIFEST

    @property
    def reflog(self) -> Path:
        """``.cvmfsreflog`` (a link into the current generation)."""
        return self.root / REFLOG

    @property
    def whitelist(self) -> Path:
        """``.cvmfswhitelist`` (a plain file, replaced atomically when re-signed)."""
        return self.root / WHITELIST

    @property
    def work(self) -> Path:
        """``.userpub``: generations and the lock (never served)."""
        return self.root / WORK

    @property
    def generations(self) -> Path:
        """``.userpub/gen``."""
        return self.work / "gen"

    @property
    def current(self) -> Path:
        """``.userpub/current`` -> ``gen/<revision>``."""
        return self.work / "current"

    @property
    def lock(self) -> Path:
        """The repository's writer lock file."""
        return self.work / "lock"

    def ensure(self) -> None:
        """Create the directories, the fixed links and the replication marker (idempotent)."""
        self.generations.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, REFLOG):
            link = self.root / name
            if not link.is_symlink():
                tmp = self.root / f".{name}.link.tmp"
                tmp.unlink(missing_ok=True)
                os.symlink(f"{WORK}/current/{name}", tmp)
                os.replace(tmp, link)
        replica = self.root / REPLICA
        if not replica.exists():
            write_atomic(replica, REPLICA_TEXT.encode())
        if not (self.root / STATUS).exists():
            write_atomic(self.root / STATUS, b"{}\n", durable=False)

    def read_manifest(self) -> Manifest | None:
        """The published manifest (signature not checked: this is our own disk), or None."""
        try:
            data = self.manifest.read_bytes()
        except FileNotFoundError:
            return None
        try:
            body, _, _ = split_letter(data)
            return Manifest.parse(body)
        except LetterError:
            return None

    def current_generation(self) -> str | None:
        """The name of the current generation directory."""
        try:
            return os.readlink(self.current).rpartition("/")[2]
        except FileNotFoundError:
            return None

    def install(self, revision: int, manifest: bytes, reflog: Path, *, durable: bool) -> None:
        """Make ``revision`` current: write its generation, flush, switch ``current``."""
        name = f"{revision:012d}"
        gen = self.generations / name
        if gen.exists():
            remove_tree(gen)
        gen.mkdir(mode=0o755)
        write_atomic(gen / MANIFEST, manifest, durable=False)
        os.chmod(reflog, 0o644)
        os.rename(reflog, gen / REFLOG)
        if durable:
            syncfs(self.root)
        tmp = self.work / f"current.{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"gen/{name}", tmp)
        os.replace(tmp, self.current)
        if durable:
            fsync_dir(self.work)
        self.prune_generations(keep=2)

    def prune_generations(self, keep: int) -> None:
        """Remove generations other than the current one and the ``keep - 1`` before it."""
        current = self.current_generation()
        names = sorted(p.name for p in self.generations.iterdir()) if self.generations.is_dir() \
            else []
        if current is None:
            return
        older = [n for n in names if n < current]
        doomed = [n for n in names if n > current] + older[: max(0, len(older) - (keep - 1))]
        for n in doomed:
            remove_tree(self.generations / n)
        for tmp in self.work.glob("current.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def write_atomic(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Write a file by writing a temporary sibling and renaming it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    """The server fields of ``repositories.json``: software version and operating system."""
    from userpub import __version__

    fields: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    except OSError:
        pass
    return {"cvmfs_version": f"userpub-{__version__}", "os_id": fields.get("ID", "linux"),
            "os_version_id": fields.get("VERSION_ID", ""),
            "os_pretty_name": fields.get("PRETTY_NAME", "Linux")}


def write_status(root: Path, **fields: str) -> None:
    """Update ``.cvmfs_status.json`` (``last_gc``: cvmfs's date format)."""
    path = root / STATUS
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        status = {}
    status.update(fields)
    write_atomic(path, (json.dumps(status, sort_keys=True) + "\n").encode(), durable=False)


def write_server_info(root: Path, *, metainfo: dict[str, object]) -> None:
    """``../info/v1/repositories.json`` and ``meta.json`` beside the repository (best effort).

    The list names the repository of every sibling directory that is a stratum 0.
    """
    base = root.parent
    info = base / "info" / "v1"
    names = sorted(m.fqrn for p in base.iterdir()
                   if os.path.lexists(p / MANIFEST) and (m := Layout(p).read_manifest()))
    repos = {"schema": 1, **os_release(),
             "repositories": [{"name": n, "url": f"/cvmfs/{n}"} for n in names], "replicas": []}
    meta = {"schema": 1, **metainfo}
    info.mkdir(parents=True, exist_ok=True)
    for fname, content in (("repositories.json", repos), ("meta.json", meta)):
        data = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()
        path = info / fname
        try:
            if path.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        write_atomic(path, data, durable=False)
