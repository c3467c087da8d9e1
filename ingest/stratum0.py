"""Serve stratum 0 directories read-only over HTTP, the way CVMFS clients and caches expect.

``make_stratum0_app({fqrn: root})`` is a plain WSGI application answering ``GET``/``HEAD`` of

* ``/cvmfs/<fqrn>/.cvmfspublished``, ``.cvmfswhitelist``, ``.cvmfsreflog``,
  ``.cvmfs_master_replica``, ``.cvmfs_status.json``, ``.cvmfs_last_snapshot`` (replicas):
  ``application/x-cvmfs``, cacheable 61 s
  (the manifest and whitelist change; proxies must re-check them soon);
* ``/cvmfs/<fqrn>/data/XX/<hash>[suffix]``: ``application/octet-stream``, cacheable 3 days
  (content-addressed, never change);
* ``/cvmfs/info/v1/repositories.json`` and ``meta.json``: the server's JSON, 61 s.

Anything else is 404 (never cached); working files of the writer are never served. There is
no ``Last-Modified`` or ``ETag`` (cvmfs_server strips them too), and bytes are sent exactly
as stored (no content encoding).
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from email.utils import formatdate
from pathlib import Path
from typing import Any

from publisher.repositories.replicas import replicas_here
from userpub.config import Config

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

SHORT_SECONDS = 61
LONG_SECONDS = 3 * 24 * 3600
_TOP = frozenset((".cvmfspublished", ".cvmfswhitelist", ".cvmfswhitelist.pkcs7", ".cvmfsreflog",
                  ".cvmfs_master_replica", ".cvmfs_status.json", ".cvmfs_last_snapshot"))
_OBJECT = re.compile(r"data/[0-9a-f]{2}/[0-9a-f]{38}(?:-rmd160|-shake128)?[CHXMPL]?")
_BLOCK = 1 << 20


def stratum0_repositories(config: Config) -> dict[str, Path]:
    """``{fqrn: directory}`` of the cvmfs-native repositories this server serves: those it
    publishes (their stratum 0) and its replicas of the others' (stratum 1s, from which a
    reinstalled companion restores)."""
    served = {r.name: r.root for r in config.hosted
              if r.backend == "cvmfs-native" and r.root is not None}
    for repo in replicas_here(config):
        assert repo.replica is not None
        served.setdefault(repo.name, repo.replica)
    return served


def make_stratum0_app(repositories: Mapping[str, Path], *, base: str = "/cvmfs") -> WsgiApp:
    """A WSGI app serving ``<base>/<fqrn>/...`` from each repository's stratum 0 directory."""
    roots = dict(repositories)
    prefix = base.rstrip("/") + "/"

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"method not allowed\n",
                           [("Allow", "GET, HEAD")])
        # the full path, so that the app works alone or mounted below /cvmfs (SCRIPT_NAME)
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not path.startswith(prefix):
            return _not_found(start_response)
        repo, _, rest = path[len(prefix):].partition("/")
        if repo == "info" and rest in ("v1/repositories.json", "v1/meta.json"):
            body = _info(roots, rest)
            headers = [*_cache_headers(SHORT_SECONDS), ("Content-Type", "application/json")]
            return _answer(start_response, "200 OK", b"" if method == "HEAD" else body, headers,
                           length=len(body))
        root = roots.get(repo)
        if root is None:
            return _not_found(start_response)
        if rest in _TOP:
            kind, seconds = "application/x-cvmfs", SHORT_SECONDS
        elif _OBJECT.fullmatch(rest):
            kind, seconds = "application/octet-stream", LONG_SECONDS
        else:
            return _not_found(start_response)
        try:
            fd = os.open(root / rest, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return _not_found(start_response)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return _not_found(start_response)
        headers = [*_cache_headers(seconds), ("Content-Type", kind),
                   ("Content-Length", str(st.st_size))]
        start_response("200 OK", headers)
        if method == "HEAD":
            os.close(fd)
            return []
        return _FileBody(fd)

    return app


class _FileBody:
    """The bytes of an open file, closed when the server is done with the response."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __iter__(self) -> Iterator[bytes]:
        while True:
            block = os.read(self.fd, _BLOCK)
            if not block:
                return
            yield block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _cache_headers(seconds: int) -> list[tuple[str, str]]:
    return [("Cache-Control", f"public, max-age={seconds}"),
            ("Expires", formatdate(time.time() + seconds, usegmt=True))]


def _answer(start_response: StartResponse, status: str, body: bytes,
            headers: list[tuple[str, str]], length: int | None = None) -> list[bytes]:
    start_response(status, [*headers, ("Content-Length", str(len(body) if length is None
                                                              else length))])
    return [body]


def _not_found(start_response: StartResponse) -> list[bytes]:
    return _answer(start_response, "404 Not Found", b"not found\n",
                   [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])


def _info(roots: Mapping[str, Path], which: str) -> bytes:
    """The server JSON the writer keeps beside the repositories, else a minimal one."""
    for root in roots.values():
        try:
            return (root.parent / "info" / which).read_bytes()
        except OSError:
            continue
    if which == "v1/meta.json":
        return b'{"schema": 1}\n'
    names = sorted(name for name, root in roots.items()
                   if os.path.exists(root / ".cvmfspublished"))
    data = {"schema": 1, "cvmfs_version": "userpub", "os_id": "linux", "os_version_id": "",
            "os_pretty_name": "Linux",
            "repositories": [{"name": n, "url": f"/cvmfs/{n}"} for n in names], "replicas": []}
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def with_stratum0(app: WsgiApp, config: Config) -> WsgiApp:
    """``app``, plus the cvmfs-native repositories hosted or replicated here served below
    ``/cvmfs/``.

    Returns ``app`` itself when this server serves no cvmfs-native repository.
    """
    repositories = stratum0_repositories(config)
    if not repositories:
        return app
    stratum0 = make_stratum0_app(repositories)

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        chosen = stratum0 if path == "/cvmfs" or path.startswith("/cvmfs/") else app
        return chosen(environ, start_response)

    return dispatch
