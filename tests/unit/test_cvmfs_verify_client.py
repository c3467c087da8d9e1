"""``userpub ls`` / ``userpub cat`` / ``userpub verify`` over HTTP on 127.0.0.1, directly and through
an HTTP proxy, on repositories written by the spec-only fixture writer."""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cvmfs_verify.client import Reader, ReadError
from cvmfs_verify.fetch import HttpSource
from cvmfs_verify.signature import load_master_keys
from tests.unit.test_cvmfs_verify_fixture import (
    Keys,
    Node,
    Written,
    make_keys,
    object_file,
    write_repository,
)
from userpub.cli import main

NAME = "test.example.org"
BIG = bytes(range(251)) * 100  # 25100 bytes: 7 chunks of 4096 (the last one shorter)
NODES = [
    Node("/top.txt", data=b"top\n"),
    Node("/sw/a/file", data=b"hello world\n"),
    Node("/sw/a/empty"),
    Node("/sw/a/rel", "link", target="file"),
    Node("/sw/a/abs", "link", target=f"/cvmfs/{NAME}/sw/b/c/d/e"),
    Node("/sw/a/var", "link", target="../b/$(FIXTURE_DIR:-c)/d/e"),
    Node("/sw/a/loop", "link", target="loop"),
    Node("/sw/a/out", "link", target="/etc/passwd"),
    Node("/sw/b/big", data=BIG),
    Node("/sw/b/h1", data=b"same inode\n", group=1),
    Node("/sw/b/h2", data=b"same inode\n", group=1),
    Node("/sw/b/c/d/e", data=b"deep\n"),
    Node("/sw/todir", "link", target="b/c"),
]


class _Quiet(SimpleHTTPRequestHandler):
    def __init__(self, *args, seen: list[str], **kwargs):
        self.seen = seen
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):
        self.seen.append(self.path)


class _Proxy(BaseHTTPRequestHandler):
    """A minimal forwarding HTTP proxy: it only accepts absolute URLs, like squid."""

    seen: list[str]

    def do_GET(self):
        self.seen.append(self.path)
        if not self.path.startswith("http://"):
            self.send_error(400, "proxy requests need an absolute URL")
            return
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.path, timeout=10) as upstream:
                body = upstream.read()
        except urllib.error.HTTPError as err:
            self.send_error(err.code)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class _StaleProxy(_Proxy):
    """A proxy holding damaged copies of objects: correct only when asked to revalidate."""

    def do_GET(self):
        if "/data/" in self.path and self.headers.get("Cache-Control") != "no-cache":
            self.seen.append("damaged " + self.path)
            body = b"damaged copy"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@contextlib.contextmanager
def _server(handler) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="test-http")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def repo(tmp_path, keys) -> Written:
    return write_repository(tmp_path / "srv" / "cvmfs" / NAME, NAME, NODES, keys,
                            nested=("/sw/a", "/sw/b", "/sw/b/c"), chunk_size=4096)


@pytest.fixture
def pub(tmp_path, keys) -> Path:
    return keys.master_pub(tmp_path)


@pytest.fixture
def served(tmp_path, repo) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = partial(_Quiet, seen=seen, directory=str(tmp_path / "srv"))
    with _server(handler) as base:
        yield f"{base}/cvmfs/{NAME}", seen


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("Proxy", (_Proxy,), {"seen": seen})
    with _server(handler) as base:
        yield base, seen


def reader(url: str, pub: Path, proxy: str | None = None) -> Reader:
    return Reader.open(HttpSource(url, proxy), load_master_keys([pub]), repo=NAME)


def test_ls_root_and_nested(served, pub):
    url, _ = served
    with reader(url, pub) as r:
        assert [e.name for e in r.listdir("/")] == [b"sw", b"top.txt"]
        assert [e.name for e in r.listdir("/sw")] == [b"a", b"b", b"todir"]
        assert [e.name for e in r.listdir("/sw/a")] == [
            b".cvmfscatalog", b"abs", b"empty", b"file", b"loop", b"out", b"rel", b"var"]
        assert [e.name for e in r.listdir("/sw/todir/d")] == [b"e"]


def test_cat_kinds_of_files(served, pub, monkeypatch):
    url, _ = served
    monkeypatch.delenv("FIXTURE_DIR", raising=False)
    with reader(url, pub) as r:
        def cat(path: str) -> bytes:
            return b"".join(r.read_file(path))

        assert cat("/top.txt") == b"top\n"
        assert cat("/sw/a/empty") == b""
        assert cat("/sw/b/big") == BIG
        assert cat("/sw/a/rel") == b"hello world\n"
        assert cat("/sw/a/abs") == b"deep\n"
        assert cat("/sw/a/../b/h2") == cat("/sw/b/h1") == b"same inode\n"
        assert cat("/sw/todir/d/e") == b"deep\n"
        assert cat("/sw/a/var") == b"deep\n"  # the default of $(FIXTURE_DIR:-c)
    monkeypatch.setenv("FIXTURE_DIR", "nowhere")
    with reader(url, pub) as r, pytest.raises(ReadError, match="/sw/b/nowhere"):
        r.resolve("/sw/a/var")


def test_symlink_errors(served, pub):
    url, _ = served
    with reader(url, pub) as r:
        with pytest.raises(ReadError, match="too many levels"):
            b"".join(r.read_file("/sw/a/loop"))
        with pytest.raises(ReadError, match="leaves the repository"):
            b"".join(r.read_file("/sw/a/out"))
        with pytest.raises(ReadError, match="no such file"):
            r.resolve("/sw/a/missing")
        with pytest.raises(ReadError, match="not a regular file"):
            b"".join(r.read_file("/sw"))


def test_catalogs_are_fetched_lazily_manifest_first(served, pub):
    url, seen = served
    with reader(url, pub) as r:
        assert b"".join(r.read_file("/top.txt")) == b"top\n"
    assert seen[0] == f"/cvmfs/{NAME}/.cvmfspublished"
    catalogs = [p for p in seen if p.endswith("C")]
    assert len(catalogs) == 1  # only the root catalog: no nested catalog is needed for /top.txt


def test_everything_goes_through_the_proxy(served, proxy, pub):
    url, direct = served
    proxy_url, through = proxy
    with reader(url, pub, proxy_url) as r:
        assert b"".join(r.read_file("/sw/b/big")) == BIG
    assert through and all(p.startswith(url) for p in through)
    assert len(direct) == len(through)  # every request the server saw came via the proxy


def test_damaged_proxy_copy_is_refetched_with_no_cache(served, pub):
    url, _ = served
    seen: list[str] = []
    with _server(type("Stale", (_StaleProxy,), {"seen": seen})) as proxy_url:
        with reader(url, pub, proxy_url) as r:
            assert b"".join(r.read_file("/sw/a/file")) == b"hello world\n"
        assert main(["verify", url, "--key", str(pub), "--proxy", proxy_url]) == 0
    assert any(p.startswith("damaged ") for p in seen)


def test_wrong_master_key_refuses_to_read(served, tmp_path):
    url, _ = served
    other = make_keys().master_pub(tmp_path, "other.pub")
    with pytest.raises(ReadError, match="does not verify with the master key"):
        reader(url, other)


def test_damaged_object_is_not_returned(served, repo, pub):
    url, _ = served
    path = object_file(repo.root, repo.objects["/top.txt"])
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with reader(url, pub) as r, pytest.raises(ReadError, match="content hash is"):
        b"".join(r.read_file("/top.txt"))


# -- the command line -------------------------------------------------------------------------


def test_cli_verify_over_http_ok(served, pub, capsys):
    url, _ = served
    assert main(["verify", url, "--key", str(pub), "--repo", NAME]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("ok: ") and "4 catalogs" in out[0]


def test_cli_verify_through_proxy_reports_problems(served, proxy, repo, pub, capsys):
    url, _ = served
    proxy_url, through = proxy
    object_file(repo.root, repo.objects["/sw/a/file"]).unlink()
    assert main(["verify", url, "--key", str(pub), "--proxy", proxy_url]) == 1
    out = capsys.readouterr().out.splitlines()
    digest = repo.objects["/sw/a/file"]
    assert out[0] == (f"catalog {repo.catalogs['/sw/a']}C /sw/a/file: object "
                      f"data/{digest[:2]}/{digest[2:]} missing")
    assert out[-1].startswith("FAILED: ")
    assert any(p.endswith(".cvmfspublished") for p in through)


def test_cli_ls(served, pub, capsys):
    url, _ = served
    assert main(["ls", url, "/sw/a", "--key", str(pub)]) == 0
    assert "rel" in capsys.readouterr().out.split()
    assert main(["ls", url, "/sw/a/rel", "-l", "--no-verify"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("lrwxrwxrwx") and line.endswith("/sw/a/rel -> file")
    assert main(["ls", url, "/sw/a/rel", "--no-verify"]) == 0
    assert capsys.readouterr().out == "/sw/a/rel\n"
    assert main(["ls", url, "/sw/todir", "--no-verify"]) == 0  # a symlink to a directory
    assert capsys.readouterr().out.split() == [".cvmfscatalog", "d"]


def test_cli_cat(served, pub, capsysbinary):
    url, _ = served
    assert main(["cat", url, "/sw/b/big", "--key", str(pub)]) == 0
    assert capsysbinary.readouterr().out == BIG


def test_cli_needs_a_key_or_no_verify(served, capsys):
    url, _ = served
    assert main(["cat", url, "/top.txt"]) == 1
    assert "--no-verify" in capsys.readouterr().err
