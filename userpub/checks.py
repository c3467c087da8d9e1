"""Startup checks shared by the daemons and ``userpub check-config`` (one copy of each).

Every function returns why something cannot work (one line), or None. The daemons run them
with ``create=True`` (a missing spool or state directory is made) and raise the problems they
find; ``userpub check-config`` runs the same functions with ``create=False``: nothing is made,
a directory that does not exist yet only has to be creatable.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from userpub.config import Config, RepositoryConfig, split_address

__all__ = ["bind_problem", "directory_problem", "in_use", "listeners", "port_conflicts",
           "repository_root_problem"]


def _writable_problem(path: Path) -> str | None:
    if os.access(path, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only filesystem"
    except OSError:
        pass
    return f"not writable by uid {os.geteuid()}"


def directory_problem(path: Path, what: str, *, create: bool) -> str | None:
    """Why ``path`` cannot be the writable directory ``what`` (e.g. ``spool``), or None.

    A missing directory is made with its parents when ``create``; otherwise it only has to be
    creatable: its nearest existing ancestor is a writable directory.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                return f"{what} {path}: cannot create it: {err.strerror}"
            return None
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{what} {path}: cannot be created: {ancestor} is not a directory"
        problem = _writable_problem(ancestor)
        return f"{what} {path}: cannot be created: {ancestor} is {problem}" if problem else None
    except OSError as err:  # a parent is a file (ENOTDIR), no search permission (EACCES)
        return f"{what} {path}: {err.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {path}: not a directory"
    problem = _writable_problem(path)
    return f"{what} {path}: {problem}" if problem else None


def repository_root_problem(repo: RepositoryConfig, *, create: bool) -> str | None:
    """Why the ``root`` of a repository published here (``local``, ``cvmfs-native``: the tree
    written) is unusable, or None.

    A missing root is never made unless the repository says ``create = true`` (then only with
    ``create``): a mistyped root, or the mount point of a repository disk that is not mounted,
    must stop the publisher instead of filling another disk.
    """
    root = repo.root
    if root is None or repo.backend == "cvmfs-server":  # there: cvmfs_server's read-only view
        return None
    if not root.exists() and not root.is_symlink():
        if not repo.create:
            return (f"repository {repo.name}: root {root} does not exist (create it, or set "
                    "create = true in its [[repository]] to let the publisher make it)")
        return directory_problem(root, f"repository {repo.name}: root", create=create)
    return directory_problem(root, f"repository {repo.name}: root", create=False)


def bind_problem(address: str, label: str) -> str | None:
    """Why ``label`` cannot listen on ``address`` (``host:port``) right now, or None."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return f"cannot listen on {label} {address}: {err.strerror}"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as err:
            return f"cannot listen on {label} {address}: {err.strerror}"
    return None


def in_use(problem: str | None) -> bool:
    """True when a :func:`bind_problem` says only that the address is taken right now."""
    return problem is not None and problem.endswith(os.strerror(errno.EADDRINUSE))


def listeners(config: Config) -> list[tuple[str, str]]:
    """(what, ``host:port``) of every address the daemons of this host listen on (port 0,
    an ephemeral port, excluded): ingest's two listeners, each publisher's and the janitor's
    ``/metrics``."""
    found: list[tuple[str, str]] = []
    if config.ingest is not None:
        found.append(("ingest.listen", config.ingest.listen))
        if config.ingest.http_listen:
            found.append(("ingest.http_listen", config.ingest.http_listen))
    if config.hosted:
        host, port = split_address(config.metrics.publisher_listen)
        if port:
            for i, repo in enumerate(config.hosted):
                where = f"[{host}]" if ":" in host else host
                found.append((f"metrics.publisher_listen (+{i}: publisher of {repo.name})",
                              f"{where}:{port + i}"))
        found.append(("metrics.janitor_listen", config.metrics.janitor_listen))
    return [(what, address) for what, address in found if split_address(address)[1]]


def port_conflicts(config: Config) -> list[str]:
    """Two daemons of this host configured to listen on one port (one line per pair)."""
    wildcard = {"0.0.0.0", "::", ""}  # noqa: S104 (addresses compared, nothing bound)
    problems: list[str] = []
    seen: list[tuple[str, str, str, int]] = []
    for what, address in listeners(config):
        host, port = split_address(address)
        for other, other_address, other_host, other_port in seen:
            if port == other_port and (host == other_host or {host, other_host} & wildcard):
                problems.append(f"{what} ({address}) and {other} ({other_address}) use the "
                                "same port")
        seen.append((what, address, host, port))
    return problems

