"""The whole pipeline into a cvmfs-native repository: real publisher, HTTP, a real squid."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from publisher.repositories import open_reader
from tests.helpers import Daemon, make_tarball, run_userpub, wait_for, write_config
from tests.requirements import tool
from tests.unit.test_cvmfs_native_invariants import (
    all_objects_hash_to_their_names,
    check_repository,
    cid_listing,
    tar_contents,
    userpub_verify,
)
from tests.unit.test_cvmfs_native_stratum0 import serve_stratum0, userpub
from userpub.config import load_config

REPO = "repo1.example.org"
SQUID = shutil.which("squid") or "/usr/sbin/squid"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_squid() -> Iterator[tuple[str, Path]]:
    """A throwaway squid on 127.0.0.1 (memory cache only); yields (proxy URL, access log)."""
    if not os.path.exists(SQUID):
        tool("squid")
    work = Path(tempfile.mkdtemp(prefix="userpub-squid-"))
    work.chmod(0o777)  # squid drops privileges to its own user
    port = free_port()
    conf = work / "squid.conf"
    conf.write_text(f"""
http_port 127.0.0.1:{port}
pid_filename {work}/squid.pid
cache_log {work}/cache.log
access_log stdio:{work}/access.log squid
cache_mem 64 MB
maximum_object_size_in_memory 32 MB
maximum_object_size 64 MB
http_access allow localhost
http_access deny all
visible_hostname userpub-test
coredump_dir {work}
shutdown_lifetime 0 seconds
netdb_filename none
""")
    proc = subprocess.Popen([SQUID, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(ready, 30, lambda: f"squid did not start: {(work / 'cache.log').read_text()}"
                 if (work / "cache.log").exists() else "squid did not start")
        yield f"http://127.0.0.1:{port}", work / "access.log"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def site(tmp_path):
    path = write_config(tmp_path / "site", repos=1, backend="cvmfs-native")
    run_userpub(path, "keys", "init", REPO)
    return path, load_config(path)


def test_publish_through_the_pipeline_verify_and_read_back_over_http_and_squid(site, tmp_path):
    path, config = site
    root = config.repositories[0].root
    key = str(config.server.state / "keys" / f"{REPO}.pub")
    rng = random.Random(9)
    tarballs = {
        "grp/small": make_tarball(tmp_path / "s.tgz", {"bin/run.sh": b"#!/bin/sh\n",
                                                        "README": b"hello\n", "empty": b""}),
        "grp/bzip": make_tarball(tmp_path / "b.tbz", {"lib/x.so": rng.randbytes(50_000)},
                                 mode="w:bz2"),
        "solo": make_tarball(tmp_path / "big.tar", {"data/big.bin": rng.randbytes(20 << 20),
                                                    "data/copy.txt": b"x" * 100_000}, mode="w"),
    }
    pub = Daemon(path, "publisher", "--repo", REPO, log=tmp_path / "publisher.log")
    try:
        pub.wait_log("publisher ready")
        for cid, tarball in tarballs.items():
            assert run_userpub(path, "drop", str(tarball), "--cid", cid).stdout.strip() == cid
        for cid in tarballs:
            wait_for(lambda c=cid: run_userpub(path, "status", c, check=False
                                               ).stdout.startswith("PRESENT:"), 120, pub.log)
        reader = open_reader(config, config.repositories[0])
        assert reader.stamped_at("solo") is None
        run_userpub(path, "drop", str(tarballs["solo"]), "--cid", "solo")  # present: a stamp
        wait_for(lambda: reader.stamped_at("solo") is not None, 60, pub.log)
        assert sorted(reader.cids()) == sorted(tarballs)
    finally:
        assert pub.stop() == 0
    assert "Traceback" not in pub.log()
    checked = check_repository(root)
    assert all_objects_hash_to_their_names(root) > 5
    userpub_verify(root, Path(key), REPO)
    assert userpub("verify", str(root), "--key", key).stdout.startswith(b"ok: ")
    for cid, tarball in tarballs.items():
        listing = cid_listing(checked, f"/sw/{cid}".encode())
        assert listing.pop(".cvmfscatalog") == b""
        assert b"userpub drop" in listing.pop(".publisher")
        assert listing == tar_contents(tarball)
    files = {f"/sw/{cid}/{name}": data for cid, t in tarballs.items()
             for name, data in tar_contents(t).items() if isinstance(data, bytes)}
    with serve_stratum0({REPO: root}) as base:
        url = f"{base}/cvmfs/{REPO}"
        assert userpub("verify", url, "--key", key, "--repo", REPO).stdout.startswith(b"ok: ")
        for name, data in files.items():
            assert userpub("cat", url, name, "--key", key).stdout == data, name
        with running_squid() as (proxy, access_log):
            for _ in range(2):  # the second round is served from squid's cache
                for name, data in files.items():
                    got = userpub("cat", url, name, "--key", key, "--proxy", proxy).stdout
                    assert got == data, name
            out = userpub("verify", url, "--key", key, "--proxy", proxy).stdout
            assert out.startswith(b"ok: ")
            via = requests.get(f"{url}/.cvmfspublished", proxies={"http": proxy}, timeout=10)
            assert via.content == (root / ".cvmfspublished").read_bytes()
            time.sleep(1)  # squid writes its log asynchronously
            log = access_log.read_text()
            assert "HIT/200" in log and "/data/" in log
            hits = [line for line in log.splitlines() if "HIT/200" in line]
            assert any(line.split()[6].endswith("C") for line in hits)  # a catalog from cache
