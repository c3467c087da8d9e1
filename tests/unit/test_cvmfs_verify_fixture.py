"""A minimal stratum-0 writer that exists ONLY to exercise the verifier (``cvmfs_verify``).

It is written straight from ``docs/cvmfs-format.md`` (§2-§9), deliberately simple (everything in
memory, fixed-size chunks, SHA-1, zlib), and shares no code with the real writer
(``publisher/repositories/cvmfs_native``) nor with the verifier: it builds small valid repositories
and, through :class:`Tweaks`, precisely broken ones. It is not a product; do not use it to publish.
The few tests at the bottom check the fixture itself against literal values of the specification.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import json
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

CATALOG_SQL = """
CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, parent_2 INTEGER,
  hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER,
  mtimens INTEGER, flags INTEGER, name TEXT, symlink TEXT, uid INTEGER,
  gid INTEGER, xattr BLOB,  CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2));
CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2);
CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER,  hash BLOB,
  CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size),
  FOREIGN KEY (md5path_1, md5path_2) REFERENCES    catalog(md5path_1, md5path_2));
CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER,
  CONSTRAINT pk_nested_catalogs PRIMARY KEY (path));
CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER,
  CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path));
CREATE TABLE statistics (counter TEXT, value INTEGER, CONSTRAINT pk_statistics PRIMARY KEY (counter));
"""
HISTORY_SQL = """
CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
CREATE TABLE tags (name TEXT, hash TEXT, revision INTEGER,   timestamp INTEGER, channel INTEGER,
  description TEXT, size INTEGER,   branch TEXT, CONSTRAINT pk_tags PRIMARY KEY (name),
  FOREIGN KEY (branch) REFERENCES branches (branch));
CREATE TABLE recycle_bin (hash TEXT, flags INTEGER,   CONSTRAINT pk_hash PRIMARY KEY (hash));
CREATE TABLE branches (branch TEXT, parent TEXT, initial_revision INTEGER,
  CONSTRAINT pk_branch PRIMARY KEY (branch),   FOREIGN KEY (parent) REFERENCES branches (branch),
  CHECK ((branch <> '') OR (parent IS NULL)),   CHECK ((branch = '') OR (parent IS NOT NULL)));
INSERT INTO branches (branch, parent, initial_revision) VALUES ('', NULL, 0);
"""
REFLOG_SQL = """
CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
CREATE TABLE refs (hash TEXT, type INTEGER, timestamp INTEGER, CONSTRAINT pk_refs PRIMARY KEY (hash));
"""
COUNTERS = ("regular", "symlink", "special", "dir", "nested", "chunked", "chunks", "file_size",
            "chunked_size", "xattr", "external", "external_file_size")
MTIME = 1_700_000_000


@dataclass
class Keys:
    """Master key, repository key and the repository's self-signed certificate."""

    master: rsa.RSAPrivateKey
    repo: rsa.RSAPrivateKey
    cert: x509.Certificate

    def master_pub(self, directory: Path, name: str = "master.pub") -> Path:
        """Write the master public key as clients get it (PEM), return its path."""
        path = directory / name
        path.write_bytes(self.master.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return path


def make_keys() -> Keys:
    """Fresh RSA-2048 keys and a self-signed certificate (spec §4)."""
    master = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    repo = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test repository")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(repo.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(repo, hashes.SHA256()))
    return Keys(master, repo, cert)


@dataclass
class Node:
    """One entry to publish: ``kind`` is dir, file or link; ``group`` > 0 makes hard links."""

    path: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int | None = None
    group: int = 0
    xattr: bytes | None = None


@dataclass
class Tweaks:
    """Deliberate deviations from the specification, to test the verifier."""

    linkcount: dict[str, int] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    whitelist_expires_in: float = 30 * 86400
    whitelist_signed: bool = True
    whitelist_name: str | None = None
    whitelist_key: rsa.RSAPrivateKey | None = None
    manifest_key: rsa.RSAPrivateKey | None = None
    reflog_omit: tuple[str, ...] = ()
    markers: bool = True
    not_zlib: tuple[str, ...] = ()
    tags: tuple[tuple[str, str, int, int], ...] = ()  # more tags: (name, root hash, revision, size)
    size: dict[str, int] = field(default_factory=dict)
    level: dict[str, int] = field(default_factory=dict)  # object suffix -> other zlib level


@dataclass
class Written:
    """What :func:`write_repository` produced."""

    root: Path
    name: str
    fields: dict[str, str]
    catalogs: dict[str, str]
    objects: dict[str, str] = field(default_factory=dict)
    root_size: int = 0


def md5_pair(path: str) -> tuple[int, int]:
    """Spec §6: MD5 of the path, bytes 0-7 and 8-15 as little-endian signed 64-bit integers."""
    a, b = struct.unpack("<qq", hashlib.md5(path.encode()).digest())
    return a, b


def store(root: Path, data: bytes, suffix: str = "", level: int = -1) -> str:
    """Spec §2: zlib-compress, name by SHA-1 of the compressed bytes, ``data/xx/rest<suffix>``."""
    packed = zlib.compress(data, level)
    digest = hashlib.sha1(packed).hexdigest()
    path = root / "data" / digest[:2] / (digest[2:] + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(packed)
    return digest


def _sqlite(script: str, fill: list[tuple[str, tuple[object, ...]]]) -> bytes:
    db = sqlite3.connect(":memory:")
    db.executescript(script)
    for sql, args in fill:
        db.execute(sql, args)
    db.commit()
    data = db.serialize()
    db.close()
    return data


def _signed(body: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """Spec §3/§5: body, ``--``, the SHA-1 hex of the body, the signature over that hex text."""
    hex_hash = hashlib.sha1(body).hexdigest().encode()
    return body + b"--\n" + hex_hash + b"\n" + sign(hex_hash)


def raw_pkcs1_sign(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    """Spec §5: RSA_private_encrypt with type-1 padding, no DigestInfo."""
    numbers = key.private_numbers()
    size = (key.key_size + 7) // 8
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(message)) + b"\x00" + message
    value = pow(int.from_bytes(block, "big"), numbers.d, numbers.public_numbers.n)
    return value.to_bytes(size, "big")


def _expand(nodes: list[Node], mounts: list[str], markers: bool) -> dict[str, Node]:
    tree: dict[str, Node] = {"": Node("", "dir")}
    for mount in mounts[1:]:
        tree.setdefault(mount, Node(mount, "dir"))
        if markers:
            tree[mount + "/.cvmfscatalog"] = Node(mount + "/.cvmfscatalog")
    for node in nodes:
        tree[node.path] = node
    for path in list(tree):
        parent = path
        while parent:
            parent = parent.rpartition("/")[0]
            tree.setdefault(parent, Node(parent, "dir"))
    return tree


def _owner(path: str, mounts: list[str]) -> str:
    return max((m for m in mounts if path == m or path.startswith(m + "/") or not m), key=len)


def write_repository(root: Path, name: str, nodes: list[Node], keys: Keys, *,
                     nested: tuple[str, ...] = (), revision: int = 1, chunk_size: int = 0,
                     tweaks: Tweaks | None = None) -> Written:
    """Write a complete, signed stratum 0 for ``nodes`` into ``root``."""
    tweaks = tweaks or Tweaks()
    root.mkdir(parents=True, exist_ok=True)
    mounts = ["", *sorted(nested)]
    tree = _expand(nodes, mounts, tweaks.markers)
    written = Written(root, name, {}, {})
    subdirs = {p: 0 for p in tree}
    for path, node in tree.items():
        if path and node.kind == "dir":
            subdirs[path.rpartition("/")[0]] += 1
    group_sizes: dict[tuple[str, int], int] = {}
    for path, node in tree.items():
        if node.group:
            key = (path.rpartition("/")[0], node.group)
            group_sizes[key] = group_sizes.get(key, 0) + 1
    rows: dict[str, list[tuple[object, ...]]] = {m: [] for m in mounts}
    chunks: dict[str, list[tuple[object, ...]]] = {m: [] for m in mounts}
    stats: dict[str, dict[str, int]] = {m: dict.fromkeys(COUNTERS, 0) for m in mounts}
    for path in sorted(tree):
        node = tree[path]
        owner = _owner(path, mounts)
        if node.kind == "dir":
            linkcount, group, size, mode, flags = 2 + subdirs[path], 0, 4096, 0o40755, 1
            content, target = None, ""
        elif node.kind == "link":
            linkcount, group, size, mode, flags = 1, 0, len(node.target.encode()), 0o120777, 12
            content, target = None, node.target
        else:
            linkcount, group = 1, node.group
            if group:
                linkcount = group_sizes[(path.rpartition("/")[0], group)]
            size, mode, flags, target = len(node.data), 0o100644, 4, ""
            content = None
            if chunk_size and len(node.data) > chunk_size:
                flags |= 64
                pieces = range(0, len(node.data), chunk_size)
                for offset in pieces:
                    piece = node.data[offset:offset + chunk_size]
                    digest = store(root, piece, "P", tweaks.level.get("P", -1))
                    chunks[owner].append((*md5_pair(path), offset, len(piece), bytes.fromhex(digest)))
                stats[owner]["chunked"] += 1
                stats[owner]["chunked_size"] += size
                stats[owner]["chunks"] += len(pieces)
            elif path in tweaks.not_zlib:  # stored raw but flagged as zlib-compressed
                digest = hashlib.sha1(node.data).hexdigest()
                object_file(root, digest).parent.mkdir(parents=True, exist_ok=True)
                object_file(root, digest).write_bytes(node.data)
                content = bytes.fromhex(digest)
            else:
                digest = store(root, node.data, "", tweaks.level.get("", -1))
                written.objects[path] = digest
                content = bytes.fromhex(digest)
        linkcount = tweaks.linkcount.get(path, linkcount)
        size = tweaks.size.get(path, size)
        mode = node.mode if node.mode is not None else mode
        hardlinks = (group << 32) | linkcount
        parent = (0, 0) if not path else md5_pair(path.rpartition("/")[0])
        row_name = path.rpartition("/")[2]
        columns = [*md5_pair(path), *parent, hardlinks, content, size, mode, MTIME, None, flags,
                   row_name, target, 0, 0, node.xattr]
        kind = {"dir": "dir", "link": "symlink"}.get(node.kind, "regular")
        if path in mounts and path:  # transition row in the parent, nested root in the child
            parent_mount = _owner(path.rpartition("/")[0], mounts)
            rows[parent_mount].append((*columns[:10], flags | 2, *columns[11:]))
            stats[parent_mount]["dir"] += 1
            stats[parent_mount]["nested"] += 1
            stats[parent_mount]["xattr"] += node.xattr is not None
            columns[10] = flags | 32
        rows[owner].append(tuple(columns))
        stats[owner][kind] += 1
        stats[owner]["xattr"] += node.xattr is not None
        if kind == "regular":
            stats[owner]["file_size"] += size
    references: dict[str, list[tuple[str, str, int]]] = {m: [] for m in mounts}
    subtree: dict[str, dict[str, int]] = {m: dict.fromkeys(COUNTERS, 0) for m in mounts}
    root_hash, root_size = "", 0
    for mount in sorted(mounts, key=lambda m: -m.count("/")):
        fill = [("INSERT INTO properties VALUES (?, ?)", (k, v)) for k, v in (
            ("schema", "2.5"), ("schema_revision", "7"), ("revision", str(revision)),
            ("last_modified", str(MTIME)))]
        if mount:
            fill.append(("INSERT INTO properties VALUES ('root_prefix', ?)", (mount,)))
        else:
            fill.append(("INSERT INTO properties VALUES ('TTL', '240')", ()))
        fill += [("INSERT INTO catalog VALUES (" + ",".join("?" * 16) + ")", r) for r in rows[mount]]
        fill += [("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)", c) for c in chunks[mount]]
        fill += [("INSERT INTO nested_catalogs VALUES (?, ?, ?)", r) for r in references[mount]]
        for counter in COUNTERS:
            for scope, table in (("self", stats), ("subtree", subtree)):
                value = tweaks.counters.get((mount, f"{scope}_{counter}"), table[mount][counter])
                fill.append(("INSERT INTO statistics VALUES (?, ?)", (f"{scope}_{counter}", value)))
        data = _sqlite(CATALOG_SQL, fill)
        digest = store(root, data, "C", tweaks.level.get("C", -1))
        written.catalogs[mount or "/"] = digest
        if mount:
            parent = _owner(mount.rpartition("/")[0], mounts)
            references[parent].append((mount, digest, len(data)))
            for counter in COUNTERS:
                subtree[parent][counter] += stats[mount][counter] + subtree[mount][counter]
        else:
            root_hash, root_size = digest, len(data)
    return _finish(written, keys, revision, root_hash, root_size, tweaks)


def _finish(written: Written, keys: Keys, revision: int, root_hash: str, root_size: int,
            tweaks: Tweaks) -> Written:
    root, name = written.root, written.name
    cert_pem = keys.cert.public_bytes(serialization.Encoding.PEM)
    cert_hash = store(root, cert_pem, "X", tweaks.level.get("X", -1))
    meta_hash = store(root, json.dumps({"administrator": "test", "email": "t@example.org",
                                        "organisation": "test", "description": "fixture",
                                        "recommended-stratum1s": [], "custom": {}}).encode(), "M",
                      tweaks.level.get("M", -1))
    history = _sqlite(HISTORY_SQL, [
        ("INSERT INTO properties VALUES (?, ?)", ("schema", "1.0")),
        ("INSERT INTO properties VALUES (?, ?)", ("schema_revision", "3")),
        ("INSERT INTO properties VALUES (?, ?)", ("fqrn", name)),
        ("INSERT INTO tags VALUES (?, ?, ?, ?, 0, ?, ?, '')",
         ("trunk", root_hash, revision, MTIME, "current HEAD", root_size)),
        *[("INSERT INTO tags VALUES (?, ?, ?, ?, 0, '', ?, '')", (n, h, r, MTIME, z))
          for n, h, r, z in tweaks.tags]])
    history_hash = store(root, history, "H", tweaks.level.get("H", -1))
    refs = {"C": (root_hash, 0), "X": (cert_hash, 1), "H": (history_hash, 2), "M": (meta_hash, 3)}
    reflog = _sqlite(REFLOG_SQL, [
        ("INSERT INTO properties VALUES (?, ?)", ("schema", "1.0")),
        ("INSERT INTO properties VALUES (?, ?)", ("fqrn", name)),
        *[("INSERT INTO refs VALUES (?, ?, ?)", (h, t, MTIME)) for letter, (h, t) in refs.items()
          if letter not in tweaks.reflog_omit]])
    (root / ".cvmfsreflog").write_bytes(reflog)
    fields = {"C": root_hash, "B": str(root_size), "R": hashlib.md5(b"").hexdigest(), "D": "240",
              "S": str(revision), "G": "no", "A": "no", "N": name, "X": cert_hash,
              "H": history_hash, "T": str(MTIME), "M": meta_hash,
              "Y": hashlib.sha1(reflog).hexdigest()}
    body = "".join(f"{k}{v}\n" for k, v in fields.items()).encode()
    manifest_key = tweaks.manifest_key or keys.repo
    (root / ".cvmfspublished").write_bytes(_signed(body, lambda h: manifest_key.sign(
        h, padding.PKCS1v15(), hashes.SHA1())))
    fingerprint = ":".join(f"{b:02X}" for b in keys.cert.fingerprint(hashes.SHA1()))
    now = time.time()
    expires = time.strftime("%Y%m%d%H%M%S", time.gmtime(now + tweaks.whitelist_expires_in))
    whitelist_body = (f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}\nE{expires}\n"
                      f"N{tweaks.whitelist_name or name}\n{fingerprint}\n").encode()
    master = tweaks.whitelist_key or keys.master
    (root / ".cvmfswhitelist").write_bytes(
        _signed(whitelist_body, lambda h: raw_pkcs1_sign(master, h)) if tweaks.whitelist_signed
        else whitelist_body)
    (root / ".cvmfs_master_replica").write_text(
        "This file marks the repository as replicatable to stratum 1 servers\n")
    written.fields = fields
    written.root_size = root_size
    return written


def object_file(root: Path, digest: str, suffix: str = "") -> Path:
    """The file of an object."""
    return root / "data" / digest[:2] / (digest[2:] + suffix)


# -- the fixture's own checks against literal values of the specification ----------------------


def test_root_path_hash_is_md5_of_empty_string():
    assert hashlib.md5(b"").hexdigest() == "d41d8cd98f00b204e9800998ecf8427e"


def test_raw_signature_recovers_with_public_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    signature = raw_pkcs1_sign(key, b"abc")
    assert key.public_key().recover_data_from_signature(signature, padding.PKCS1v15(), None) \
        == b"abc"


def test_whitelist_expiry_is_utc(tmp_path):
    keys = make_keys()
    written = write_repository(tmp_path, "fixture.example.org", [Node("/a", data=b"x")], keys)
    lines = (written.root / ".cvmfswhitelist").read_bytes().split(b"\n")
    expires = calendar.timegm(time.strptime(lines[1][1:].decode(), "%Y%m%d%H%M%S"))
    assert abs(expires - time.time() - 30 * 86400) < 120
