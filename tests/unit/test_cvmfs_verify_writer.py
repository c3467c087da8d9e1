"""The independent verifier and client against what the real writer (``cvmfs-native``) produces.

The writer is used only through its public API (``NativeRepository``, ``init_keys``); the
checks are ``cvmfs_verify``'s, which shares no code with it.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from cvmfs_verify.client import Reader
from cvmfs_verify.fetch import HttpSource, open_source
from cvmfs_verify.report import Report
from cvmfs_verify.signature import load_master_keys
from cvmfs_verify.verify import Options, verify_repository
from publisher.repositories.cvmfs_native import KeyFiles, NativeRepository, init_keys
from publisher.tarball import UnpackLimits
from tests.unit.test_cvmfs_verify_client import _Quiet, _server
from userpub.cli import main

NAME = "native.example.org"
MTIME = 1_700_000_000


def _tarball(path: Path, members: list[tuple[str, str, bytes | str]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size, info.mode = len(data), 0o755 if kind == "exe" else 0o644
                tar.addfile(info, io.BytesIO(data))


MEMBERS: list[tuple[str, str, bytes | str]] = [
    ("bin", "dir", b""),
    ("bin/run", "exe", b"#!/bin/sh\necho hello\n"),
    ("bin/empty", "file", b""),
    ("bin/rel", "symlink", "run"),
    ("bin/up", "symlink", "../lib/deep/x.txt"),
    ("bin/hard", "hardlink", "bin/run"),
    ("lib/deep/x.txt", "file", b"x" * 1000),
    ("lib/caf\u00e9.txt", "file", b"unicode name\n"),
    ("data/big.bin", "file", os.urandom(20 << 20)),  # above the 4 MiB minimum: chunked
]


def keys_of(files: KeyFiles) -> Options:
    return Options(tuple(load_master_keys([files.master_public])), repo=NAME)


def problems(report: Report) -> list[str]:
    return [str(p) for p in report.problems]


@pytest.fixture
def native(tmp_path) -> tuple[NativeRepository, KeyFiles]:
    files = init_keys(tmp_path / "keys", NAME)
    repo = NativeRepository(NAME, tmp_path / "srv" / "cvmfs" / NAME, "sw", "ts", f"/cvmfs/{NAME}",
                            keys=files, durable=False, keep_hours=0)
    repo.initialize()
    return repo, files


@pytest.fixture
def served(tmp_path, native) -> Iterator[str]:
    handler = partial(_Quiet, seen=[], directory=str(tmp_path / "srv"))
    with _server(handler) as base:
        yield f"{base}/cvmfs/{NAME}"


def test_published_tarball_verifies_and_reads_back_over_http(tmp_path, native, served):
    repo, files = native
    payload = tmp_path / "code.tar.gz"
    _tarball(payload, MEMBERS)
    with repo.transaction() as txn:
        txn.add("grp/c1", payload, "tester", UnpackLimits())
    report = verify_repository(open_source(str(repo.root)), keys_of(files))
    assert report.ok, problems(report)
    over_http = verify_repository(HttpSource(served), keys_of(files))
    assert over_http.ok, problems(over_http)
    with Reader.open(HttpSource(served), list(keys_of(files).keys), repo=NAME) as reader:
        for name, kind, data in MEMBERS:
            path = f"/sw/grp/c1/{name}"
            if kind in ("file", "exe"):
                assert b"".join(reader.read_file(path)) == data, name
            elif kind == "symlink":
                assert reader.resolve(path, follow=False).entry.symlink == str(data).encode()
            elif kind == "hardlink":
                assert b"".join(reader.read_file(path)) == b"".join(
                    reader.read_file(f"/sw/grp/c1/{data}"))
        big = reader.resolve("/sw/grp/c1/data/big.bin").entry
        assert big.has(64), "a 20 MiB file is chunked"
        assert b"".join(reader.read_file("/sw/grp/c1/bin/up")) == b"x" * 1000


def test_cli_verify_of_the_served_writer_output(tmp_path, native, served, capsys):
    repo, files = native
    payload = tmp_path / "small.tar.gz"
    _tarball(payload, MEMBERS[:7])
    with repo.transaction() as txn:
        txn.add("c2", payload, "tester", UnpackLimits())
    assert main(["verify", served, "--key", str(files.master_public), "--repo", NAME]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert main(["cat", served, "/sw/c2/bin/run", "--key", str(files.master_public)]) == 0
    assert capsys.readouterr().out == "#!/bin/sh\necho hello\n"


def test_every_step_of_a_repository_life_verifies(tmp_path, native):
    repo, files = native
    options = keys_of(files)
    for i in range(3):
        payload = tmp_path / f"{i}.tar.gz"
        _tarball(payload, [(f"f{i}", "file", os.urandom(1000)), ("common", "file", b"same")])
        with repo.transaction() as txn:
            txn.add(f"grp/c{i}", payload, "tester", UnpackLimits())
    with repo.transaction() as txn:
        txn.stamp(["grp/c1"], "tester")
    report = verify_repository(open_source(str(repo.root)), options)
    assert report.ok, problems(report)
    with repo.transaction() as txn:
        txn.remove(["grp/c0"], ["grp/c1"])
    report = verify_repository(open_source(str(repo.root)), options)
    assert report.ok, problems(report)
    assert report.unreferenced, "the removed CID's objects (and old histories) wait for gc"
    repo.gc()
    report = verify_repository(open_source(str(repo.root)), options)
    assert report.ok, problems(report)
    assert report.unreferenced == 0, "gc left garbage"
