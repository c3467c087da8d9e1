"""``userpub tar``: the same tree gives the same bytes (so the same CID); a change does not."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from userpub.cli import main
from userpub_client.reproducible_tar import TarballError, check_tarball, make_tarball, tarball_cid


def build_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "empty").mkdir(parents=True)
    (root / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "run.sh").chmod(0o700)
    (root / "lib" / "data.txt").write_text("data\n")
    (root / "lib" / "data.txt").chmod(0o600)
    (root / "lib" / "hard.txt").hardlink_to(root / "lib" / "data.txt")
    (root / "README").write_text("readme\n")
    (root / "link").symlink_to("lib/data.txt")
    (root / ("n" * 120)).write_text("long name\n")  # needs a PAX header
    return root


def touch_everything(root: Path, when: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_runs_are_byte_identical(tmp_path):
    tree = build_tree(tmp_path / "code")
    first = make_tarball(tree, tmp_path / "one.tar.gz")
    touch_everything(tree, 1_600_000_000)
    (tree / "bin" / "run.sh").chmod(0o750)  # other permission bits, same "executable"
    second = make_tarball(tree, tmp_path / "two.tar.gz")
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    assert first.files == second.files == 5
    assert (first.directories, first.symlinks) == (3, 1)


def test_same_content_elsewhere_gives_the_same_tarball(tmp_path):
    a = make_tarball(build_tree(tmp_path / "a"), tmp_path / "a.tar.gz")
    b = make_tarball(build_tree(tmp_path / "b" / "deeper"), tmp_path / "b.tar.gz")
    assert sha(a.path) == sha(b.path)


def test_a_change_gives_another_cid(tmp_path):
    tree = build_tree(tmp_path / "code")
    before = tarball_cid(make_tarball(tree, tmp_path / "t.tar.gz").path, "g")
    (tree / "README").write_text("readme, changed\n")
    after = tarball_cid(make_tarball(tree, tmp_path / "t.tar.gz").path, "g")
    assert before != after
    assert before.startswith("g/")
    (tree / "README").write_text("readme\n")
    (tree / "bin" / "run.sh").chmod(0o644)  # no longer executable: a real change
    assert tarball_cid(make_tarball(tree, tmp_path / "t.tar.gz").path, "g") not in (before, after)


def test_members_are_normalised(tmp_path):
    tree = build_tree(tmp_path / "code")
    out = make_tarball(tree, tmp_path / "t.tar.gz", mtime=1234).path
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == ["README", "bin", "bin/run.sh", "lib", "lib/data.txt", "lib/empty",
                     "lib/hard.txt", "link", "n" * 120]
    by_name = {m.name: m for m in members}
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 1234)}
    assert by_name["bin/run.sh"].mode == 0o755
    assert by_name["lib/data.txt"].mode == 0o644
    assert by_name["lib"].mode == 0o755
    assert by_name["lib/hard.txt"].isfile()  # a hard link is stored as a plain file
    assert by_name["link"].issym()
    assert by_name["link"].linkname == "lib/data.txt"


def test_gzip_header_has_no_time_or_name(tmp_path):
    out = make_tarball(build_tree(tmp_path / "code"), tmp_path / "t.tar.gz").path
    header = out.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] == 0  # FLG: no FNAME
    assert header[4:8] == b"\0\0\0\0"  # MTIME
    assert gzip.decompress(out.read_bytes())  # and it is valid


def test_excludes_and_output_inside_the_tree(tmp_path, monkeypatch):
    tree = build_tree(tmp_path / "code")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref\n")
    (tree / "lib" / "x.pyc").write_text("")
    monkeypatch.chdir(tree)
    out = make_tarball(Path("."), Path("code.tar.gz"), excludes=[".git", "*.pyc"])
    with tarfile.open(out.path) as tar:
        names = tar.getnames()
    assert not any(n.startswith(".git") or n.endswith(".pyc") or "code.tar.gz" in n
                   for n in names)
    assert not list(tree.glob(".*.part"))
    again = make_tarball(Path("."), Path("code.tar.gz"), excludes=[".git", "*.pyc"])
    assert again.size == out.size  # the previous output is not archived either


def test_unsupported_files(tmp_path):
    tree = build_tree(tmp_path / "code")
    os.mkfifo(tree / "pipe")
    with pytest.raises(TarballError, match="not a file, directory or symlink"):
        make_tarball(tree, tmp_path / "t.tar.gz")
    assert not (tmp_path / "t.tar.gz").exists()
    assert not list(tmp_path.glob(".*.part"))
    make_tarball(tree, tmp_path / "t.tar.gz", excludes=["pipe"])
    with pytest.raises(TarballError, match="not a directory"):
        make_tarball(tree / "README", tmp_path / "u.tar.gz")


def test_check_tarball(tmp_path):
    out = make_tarball(build_tree(tmp_path / "code"), tmp_path / "t.tar.gz").path
    assert check_tarball(out) == out.stat().st_size
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(tmp_path / "code" / "README", "README")
    assert check_tarball(plain) > 0
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TarballError, match="not a tar file"):
        check_tarball(tmp_path / "notes.txt")
    with pytest.raises(TarballError, match="is a directory"):
        check_tarball(tmp_path / "code")


def test_tar_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JOBSUB_GROUP", raising=False)
    monkeypatch.delenv("GROUP", raising=False)
    tree = build_tree(tmp_path / "code")
    monkeypatch.chdir(tmp_path)
    assert main(["tar", str(tree), "--group", "g"]) == 0
    out, err = capsys.readouterr()
    assert out == "code.tar.gz\n"
    digest = sha(tmp_path / "code.tar.gz")
    assert f"cid g/{digest}" in err
    assert main(["tar", str(tree), "-o", "other.tgz", "--mtime", "5"]) == 0
    assert capsys.readouterr().out == "other.tgz\n"
    assert sha(tmp_path / "other.tgz") != digest
    assert main(["tar", str(tmp_path / "missing")]) == 1
