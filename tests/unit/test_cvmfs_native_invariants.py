"""An independent check of a cvmfs-native stratum 0 against the format notes, with sqlite3.

``check_repository(root)`` opens every catalog of the published revision and checks the
invariants genuine readers rely on (§6-§10 of the notes); ``read_tree(root)`` reads every file
back from the objects. Written from the notes, not from the writer's modules, and used by the
other cvmfs-native tests. The tests here publish varied tarballs and run both.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import stat
import struct
import tarfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

COUNTERS = ("regular", "symlink", "special", "dir", "nested", "chunked", "chunks", "file_size",
            "chunked_size", "xattr", "external", "external_file_size")


def md5pair(path: bytes) -> tuple[int, int]:
    return struct.unpack("<qq", hashlib.md5(path).digest())


def load_object(root: Path, hexhash: str, suffix: str = "") -> bytes:
    raw = (root / "data" / hexhash[:2] / (hexhash[2:] + suffix)).read_bytes()
    assert hashlib.sha1(raw).hexdigest() == hexhash, f"object {hexhash}{suffix} hash mismatch"
    return zlib.decompress(raw)


def manifest_fields(root: Path) -> dict[str, str]:
    data = (root / ".cvmfspublished").read_bytes()
    body = data[: data.index(b"\n--\n") + 1]
    return {line[:1]: line[1:] for line in body.decode().splitlines()}


def open_catalog(root: Path, hexhash: str) -> tuple[sqlite3.Connection, int]:
    data = load_object(root, hexhash, "C")
    conn = sqlite3.connect(":memory:")
    conn.deserialize(data)
    return conn, len(data)


@dataclass
class Checked:
    """What check_repository saw."""

    catalogs: int = 0
    rows: int = 0
    files: dict[bytes, bytes] = field(default_factory=dict)  # path -> content
    links: dict[bytes, bytes] = field(default_factory=dict)  # path -> target
    dirs: set[bytes] = field(default_factory=set)
    modes: dict[bytes, int] = field(default_factory=dict)
    mtimes: dict[bytes, float] = field(default_factory=dict)
    inodes: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # (catalog, group)


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    c: Counter[str] = Counter()
    for flags, size, xattr in conn.execute("SELECT flags, size, xattr FROM catalog"):
        if flags & 1:
            c["dir"] += 1
        elif flags & 8:
            c["symlink"] += 1
        elif flags & 16:
            c["special"] += 1
        else:
            c["regular"] += 1
            c["file_size"] += size
            if flags & 64:
                c["chunked"] += 1
                c["chunked_size"] += size
        if xattr is not None:
            c["xattr"] += 1
    c["chunks"] = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    c["nested"] = conn.execute("SELECT count(*) FROM nested_catalogs").fetchone()[0]
    return {k: c[k] for k in COUNTERS}


def check_catalog(root: Path, hexhash: str, mount: bytes, out: Checked, revision: int,
                  parent_row: tuple | None) -> dict[str, int]:
    """Check one catalog and (recursively) its nested catalogs; return self+subtree counts."""
    conn, _ = open_catalog(root, hexhash)
    out.catalogs += 1
    props = dict(conn.execute("SELECT key, value FROM properties"))
    assert props["schema"] == "2.5" and props["schema_revision"] == "7"
    assert int(props["revision"]) <= revision
    if mount == b"":
        assert "root_prefix" not in props and int(props["revision"]) == revision
    else:
        assert props["root_prefix"] == mount.decode()
    cols = ("md5path_1, md5path_2, parent_1, parent_2, hardlinks, hash, size, mode, mtime, "
            "mtimens, flags, name, symlink, uid, gid, xattr")
    rows = {(r[0], r[1]): r for r in conn.execute(f"SELECT {cols} FROM catalog")}
    out.rows += len(rows)
    nested = {p.encode(): (h, s) for p, h, s in conn.execute("SELECT * FROM nested_catalogs")}
    assert not conn.execute("SELECT count(*) FROM bind_mountpoints").fetchone()[0]
    children: defaultdict[tuple[int, int], list[tuple]] = defaultdict(list)
    for r in rows.values():
        children[(r[2], r[3])].append(r)
    top = rows[md5pair(mount)]
    if mount == b"":
        assert (top[2], top[3]) == (0, 0) and top[10] == 1
    else:
        assert (top[2], top[3]) == md5pair(mount.rpartition(b"/")[0]) and top[10] == 33
        assert parent_row is not None and parent_row[10] == 3
        assert parent_row[:10] + parent_row[11:] == top[:10] + top[11:], "transition row differs"
        marker = rows.get(md5pair(mount + b"/.cvmfscatalog"))
        assert marker is not None and marker[10] == 4, f"no marker in {mount!r}"
    seen = 0
    sub: Counter[str] = Counter()
    stack = [(mount, top)]
    while stack:
        path, row = stack.pop()
        seen += 1
        flags, mode, links = row[10], row[7], row[4]
        assert row[12] is not None, "symlink column is NULL"
        out.modes[path] = mode
        out.mtimes[path] = row[8] + (row[9] or 0) / 1e9
        if flags & 1:
            kids = children.get(md5pair(path), []) if not flags & 2 or path == mount else []
            if flags & 2 and path != mount:  # a transition point: the child has the rows
                assert path in nested, f"{path!r} not in nested_catalogs"
                h, size = nested[path]
                child = check_catalog(root, h, path, out, revision, row)
                assert open_catalog(root, h)[1] == size, "nested catalog size"
                for k, v in child.items():
                    sub[k] += v
                continue
            assert stat.S_ISDIR(mode) and row[5] is None and row[6] == 4096
            subdirs = sum(1 for k in kids if k[10] & 1)
            assert links & 0xFFFFFFFF == 2 + subdirs, f"linkcount of {path!r}"
            out.dirs.add(path)
            groups: Counter[int] = Counter(k[4] >> 32 for k in kids if k[4] >> 32)
            for k in kids:
                name = k[11].encode()
                assert name and b"/" not in name
                if k[4] >> 32:
                    assert k[4] & 0xFFFFFFFF == groups[k[4] >> 32], "hardlink count"
                elif not k[10] & 1:
                    assert k[4] & 0xFFFFFFFF == 1
                stack.append((path + b"/" + name if path or mount else b"/" + name, k))
        elif flags & 8:
            assert flags == 12 and stat.S_ISLNK(mode) and row[5] is None
            assert row[12] and row[6] == len(row[12].encode())
            out.links[path] = row[12].encode()
        else:
            assert flags & ~64 == 4 and stat.S_ISREG(mode), f"flags of {path!r}"
            if flags & 64:
                assert row[5] is None
                chunks = conn.execute("SELECT offset, size, hash FROM chunks WHERE md5path_1 = ? "
                                      "AND md5path_2 = ? ORDER BY offset", row[:2]).fetchall()
                assert len(chunks) > 1 and chunks[0][0] == 0
                data = b""
                for off, size, h in chunks:
                    assert off == len(data)
                    piece = load_object(root, bytes(h).hex(), "P")
                    assert len(piece) == size
                    data += piece
            else:
                assert row[5] is not None, f"regular file {path!r} without hash"
                data = load_object(root, bytes(row[5]).hex())
            assert len(data) == row[6]
            out.files[path] = data
            out.inodes[path] = (hash(hexhash), row[4] >> 32)
    assert seen == len(rows), f"{len(rows) - seen} rows of {mount!r} not reachable"
    own = _counts(conn)
    stored = dict(conn.execute("SELECT counter, value FROM statistics"))
    for k in COUNTERS:
        assert stored[f"self_{k}"] == own[k], f"self_{k} of {mount!r}"
        assert stored[f"subtree_{k}"] == sub[k], f"subtree_{k} of {mount!r}"
    return {k: own[k] + sub[k] for k in COUNTERS}


def check_repository(root: Path) -> Checked:
    """Check the published revision of the stratum 0 at ``root``; return what it holds."""
    fields = manifest_fields(root)
    assert fields["R"] == "d41d8cd98f00b204e9800998ecf8427e"
    out = Checked()
    revision = int(fields["S"])
    check_catalog(root, fields["C"], b"", out, revision, None)
    assert open_catalog(root, fields["C"])[1] == int(fields["B"])
    history = sqlite3.connect(":memory:")
    history.deserialize(load_object(root, fields["H"], "H"))
    tags = {n: (h, r) for n, h, r in history.execute("SELECT name, hash, revision FROM tags")}
    assert tags["trunk"] == (fields["C"], revision)
    reflog = (root / ".cvmfsreflog").read_bytes()
    assert hashlib.sha1(reflog).hexdigest() == fields["Y"]
    conn = sqlite3.connect(":memory:")
    conn.deserialize(reflog)
    refs = dict(conn.execute("SELECT hash, type FROM refs"))
    for letter, kind in (("C", 0), ("X", 1), ("H", 2), ("M", 3)):
        assert refs.get(fields[letter]) == kind, f"reflog lacks {letter}"
    load_object(root, fields["X"], "X")
    load_object(root, fields["M"], "M")
    return out


def userpub_verify(root: Path, master_pub: Path, repo: str | None = None) -> str:
    """Run the project's verifier (``userpub verify``, written independently) in-process."""
    from cvmfs_verify.fetch import DirectorySource
    from cvmfs_verify.signature import load_master_keys
    from cvmfs_verify.verify import Options, verify_repository

    report = verify_repository(DirectorySource(root),
                               Options(tuple(load_master_keys([master_pub])), repo=repo))
    assert report.ok, "\n".join(str(p) for p in report.problems)
    return report.summary()


def all_objects_hash_to_their_names(root: Path) -> int:
    """Re-hash every stored object, and re-compress it as stratum 1s and cvmfs_fsck do
    (zlib's default level: docs/cvmfs-format.md); return how many."""
    n = 0
    for sub in (root / "data").iterdir():
        if sub.name == "txn":
            continue
        for f in sub.iterdir():
            name = sub.name + f.name
            hexhash = name[:40]
            raw = f.read_bytes()
            assert hashlib.sha1(raw).hexdigest() == hexhash, name
            assert zlib.compress(zlib.decompress(raw)) == raw, f"{name}: not CernVM-FS's deflate"
            n += 1
    return n


def tar_contents(path: Path) -> dict[str, bytes | str]:
    """name -> bytes (files), '-> target' (symlinks), 'dir'; hard links resolved."""
    out: dict[str, bytes | str] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            name = os.path.normpath(m.name).lstrip("./") if m.name not in (".", "./") else ""
            if not name:
                continue
            if m.isdir():
                out[name] = "dir"
            elif m.issym():
                out[name] = "-> " + m.linkname
            elif m.islnk():
                out[name] = out[os.path.normpath(m.linkname)]
            else:
                f = tar.extractfile(m)
                assert f is not None
                out[name] = f.read()
            parts = name.split("/")
            for i in range(1, len(parts)):
                out.setdefault("/".join(parts[:i]), "dir")
    return out


def cid_listing(checked: Checked, base: bytes) -> dict[str, bytes | str]:
    """What check_repository saw below ``base``, as tar_contents shows a tarball."""
    out: dict[str, bytes | str] = {}
    prefix = base + b"/"
    for path, data in checked.files.items():
        if path.startswith(prefix):
            out[path[len(prefix):].decode()] = data
    for path, target in checked.links.items():
        if path.startswith(prefix):
            out[path[len(prefix):].decode()] = "-> " + target.decode()
    for path in checked.dirs:
        if path.startswith(prefix):
            out[path[len(prefix):].decode()] = "dir"
    return out


# -- tests ---------------------------------------------------------------------------------------


def _tar(path: Path, entries: list[tuple[str, str, bytes | str]], mode: str = "w:gz") -> Path:
    """entries: (kind, name, data-or-target) with kind file|dir|sym|hard."""
    with tarfile.open(path, mode) as tar:
        for kind, name, value in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(value, bytes)
                ti.size = len(value)
                ti.mode = 0o755 if name.endswith(".sh") else 0o644
                tar.addfile(ti, io.BytesIO(value))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o700
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(value)
            else:
                ti.type, ti.linkname = tarfile.LNKTYPE, str(value)
            tar.addfile(ti)
    return path


@pytest.fixture
def repo(tmp_path):
    from publisher.repositories.cvmfs_native import NativeRepository, init_keys
    from publisher.repositories.cvmfs_native.chunking import ChunkParams

    keys = init_keys(tmp_path / "keys", "repo.example.org")
    r = NativeRepository("repo.example.org", tmp_path / "srv" / "repo.example.org", "sw", "ts",
                         "/cvmfs/repo.example.org", keys=keys, durable=False,
                         chunk_params=ChunkParams(64 << 10, 128 << 10, 256 << 10))
    r.recover()
    return r


def test_varied_tarballs_satisfy_every_invariant_and_read_back(repo, tmp_path):
    from publisher.tarball import UnpackLimits

    rng = __import__("random").Random(5)
    big = rng.randbytes(1_500_000)  # chunked with the test's 64/128/256 KiB parameters
    entries = [
        ("dir", "a", b""), ("file", "a/x.txt", b"hello\n"), ("file", "a/empty", b""),
        ("file", "a/run.sh", b"#!/bin/sh\n"), ("hard", "a/x-link", "a/x.txt"),
        ("hard", "a/x-link2", "a/x.txt"), ("hard", "b/x-elsewhere", "a/x.txt"),
        ("sym", "a/to-x", "x.txt"), ("sym", "b/up", "../a/run.sh"),
        ("file", "big/blob.bin", big), ("file", "big/same.bin", big),
        ("file", "sub/.cvmfscatalog", b""), ("file", "sub/deep/f", b"in a user-marked catalog"),
        ("file", "sub/deep/.cvmfscatalog", b""), ("file", "sub/deep/g/h", b"h"),
        ("file", "dup", b"first"), ("file", "dup", b"second"),
    ]
    t1 = _tar(tmp_path / "t1.tgz", entries)
    t2 = _tar(tmp_path / "t2.tar", [("file", "only", b"group member")], mode="w")
    t3 = _tar(tmp_path / "t3.tar.xz", [("file", "x", b"one-part")], mode="w:xz")
    with repo.transaction() as txn:
        txn.add("grp/one", t1, "alice", UnpackLimits())
        txn.add("grp/two", t2, "bob", UnpackLimits())
        txn.add("solo", t3, "carol", UnpackLimits())
        txn.stamp(["grp/one", "solo"], "dave")
    checked = check_repository(repo.root)
    userpub_verify(repo.root, repo.key_files.master_public, "repo.example.org")
    assert all_objects_hash_to_their_names(repo.root) > 10
    for cid, tarball in (("grp/one", t1), ("grp/two", t2), ("solo", t3)):
        got = cid_listing(checked, f"/sw/{cid}".encode())
        assert got.pop(".cvmfscatalog") == b""
        assert got.pop(".publisher") in (b"alice\n", b"bob\n", b"carol\n")
        assert got == tar_contents(tarball), cid
    base = b"/sw/grp/one"
    # hard links: one group within a directory (3 names), a plain copy in another directory
    groups = {checked.inodes[base + n] for n in (b"/a/x.txt", b"/a/x-link", b"/a/x-link2")}
    assert len(groups) == 1 and next(iter(groups))[1] > 0
    assert checked.inodes[base + b"/b/x-elsewhere"][1] == 0
    assert checked.modes[base + b"/a/run.sh"] == 0o100755
    assert checked.modes[base + b"/a/x.txt"] == 0o100644
    assert checked.modes[base + b"/a"] == 0o40755  # 0o700 | 0o755, as unpack does
    assert checked.mtimes[base + b"/a/x.txt"] == 1_700_000_000
    assert checked.files[b"/ts/grp/one"] == b"dave\n"
    assert checked.catalogs == 9  # root, /sw, /ts, /sw/grp, 3 CIDs, 2 user-marked


def test_every_revision_keeps_the_invariants(repo, tmp_path):
    from publisher.tarball import UnpackLimits

    revisions = []
    for i in range(4):
        t = _tar(tmp_path / f"r{i}.tgz", [("file", f"f{i}", bytes([i]) * 100)])
        with repo.transaction() as txn:
            txn.add(f"g{i % 2}/c{i}", t, "u", UnpackLimits())
            txn.add(f"top{i}", t, "u", UnpackLimits())
            if i == 2:
                txn.remove(["g0/c0", "top1"], [])
            txn.stamp([f"top{i}"], "u")
        check_repository(repo.root)
        userpub_verify(repo.root, repo.key_files.master_public)
        revisions.append(int(manifest_fields(repo.root)["S"]))
    assert revisions == sorted(set(revisions))
    with repo.transaction() as txn:
        txn.remove(["g0/c2"], ["top0", "top1"])
    checked = check_repository(repo.root)
    assert not any(p.startswith(b"/sw/g0") for p in checked.dirs)  # the empty group is gone
    assert sorted(repo.cids()) == ["g1/c1", "g1/c3", "top0", "top2", "top3"]
    assert sorted(repo.stamps()) == ["top2", "top3"]
