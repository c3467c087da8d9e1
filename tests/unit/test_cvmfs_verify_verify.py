"""``cvmfs_verify.verify``: a valid fixture repository passes; each corruption is reported
once, with a precise location. Repositories come from the spec-only fixture writer."""

from __future__ import annotations

import calendar
import sqlite3
import time
import zlib
from pathlib import Path

import pytest

from cvmfs_verify.fetch import open_source
from cvmfs_verify.report import Report
from cvmfs_verify.signature import load_master_keys
from cvmfs_verify.verify import Options, verify_repository
from tests.unit.test_cvmfs_verify_fixture import (
    Keys,
    Node,
    Tweaks,
    Written,
    make_keys,
    object_file,
    store,
    write_repository,
)

NAME = "test.example.org"
NODES = [
    Node("/sw/a/file", data=b"hello world\n"),
    Node("/sw/a/empty"),
    Node("/sw/a/link", "link", target="file"),
    Node("/sw/b/big", data=bytes(range(256)) * 64 + b"tail"),
    Node("/sw/b/h1", data=b"same inode", group=1),
    Node("/sw/b/h2", data=b"same inode", group=1),
    Node("/sw/b/c/d/e", data=b"deep"),
    Node("/top.txt", data=b"top"),
]
NESTED = ("/sw/a", "/sw/b", "/sw/b/c")


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


def build(tmp_path: Path, keys: Keys, tweaks: Tweaks | None = None) -> Written:
    return write_repository(tmp_path / "repo", NAME, NODES, keys, nested=NESTED, chunk_size=4096,
                            tweaks=tweaks)


def run(written: Written, keys: Keys, **options: object) -> Report:
    pub = keys.master_pub(written.root.parent)
    opts = Options(tuple(load_master_keys([pub])), repo=NAME, **options)  # type: ignore[arg-type]
    return verify_repository(open_source(str(written.root)), opts)


def lines(report: Report) -> list[str]:
    return [str(p) for p in report.problems]


def only(report: Report, *needles: str) -> str:
    """The single problem line, which must contain every needle."""
    found = lines(report)
    assert len(found) == 1, found
    for needle in needles:
        assert needle in found[0], found[0]
    return found[0]


def test_valid_repository(tmp_path, keys):
    report = run(build(tmp_path, keys), keys)
    assert report.ok, lines(report)
    assert report.catalogs == 4
    assert report.revision == 1
    assert report.unreferenced == 0
    assert "4 catalogs" in report.summary()


def test_flipped_byte_in_file_object(tmp_path, keys):
    written = build(tmp_path, keys)
    digest = written.objects["/sw/a/file"]
    path = object_file(written.root, digest)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    only(run(written, keys), f"catalog {written.catalogs['/sw/a']}C /sw/a/file",
         f"data/{digest[:2]}/{digest[2:]}", "content hash is", "not the name's")


def test_missing_chunk(tmp_path, keys):
    written = build(tmp_path, keys)
    chunk = next(p for p in (written.root / "data").rglob("*P"))
    chunk.unlink()
    line = only(run(written, keys), f"catalog {written.catalogs['/sw/b']}C /sw/b/big (chunk",
                "missing")
    assert chunk.name in line


def test_missing_nested_catalog(tmp_path, keys):
    written = build(tmp_path, keys)
    object_file(written.root, written.catalogs["/sw/b/c"], "C").unlink()
    report = run(written, keys)
    assert any(f"catalog {written.catalogs['/sw/b/c']}C /sw/b/c: catalog object data/" in line
               for line in lines(report)), lines(report)
    assert report.catalogs == 3


def test_wrong_directory_linkcount(tmp_path, keys):
    report = run(build(tmp_path, keys, Tweaks(linkcount={"/sw/b/c/d": 5})), keys)
    catalog = build(tmp_path / "x", keys, Tweaks(linkcount={"/sw/b/c/d": 5})).catalogs["/sw/b/c"]
    only(report, f"catalog {catalog}C /sw/b/c/d", "directory linkcount is 5, expected 2")


def test_wrong_hardlink_linkcount(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(linkcount={"/sw/b/h1": 3, "/sw/b/h2": 3}))
    only(run(written, keys), f"catalog {written.catalogs['/sw/b']}C /sw/b (hardlink group 1)",
         "linkcount is 3, but 2 entries share the group")


def test_wrong_counter(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(counters={("/sw/a", "self_regular"): 7}))
    only(run(written, keys), f"catalog {written.catalogs['/sw/a']}C /sw/a",
         "statistics counter self_regular is 7, expected 3")


def test_wrong_subtree_counter(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(counters={("", "subtree_dir"): 1}))
    only(run(written, keys), f"catalog {written.catalogs['/']}C /",
         "statistics counter subtree_dir is 1, expected 5")


def test_unsigned_whitelist(tmp_path, keys):
    report = run(build(tmp_path, keys, Tweaks(whitelist_signed=False)), keys)
    only(report, "whitelist .cvmfswhitelist", "unsigned")


def test_expired_whitelist(tmp_path, keys):
    report = run(build(tmp_path, keys, Tweaks(whitelist_expires_in=-7200)), keys)
    only(report, "whitelist .cvmfswhitelist: expired at")


def test_whitelist_expiry_has_hour_granularity(tmp_path, keys):
    written = build(tmp_path, keys)
    stamp = (written.root / ".cvmfswhitelist").read_text(errors="replace").split("\n")[1][1:]
    hour = calendar.timegm(time.strptime(stamp, "%Y%m%d%H%M%S")) // 3600 * 3600
    assert run(written, keys, now=hour - 1).ok
    only(run(written, keys, now=hour), "whitelist .cvmfswhitelist: expired at")


def test_whitelist_signed_by_another_master_key(tmp_path, keys):
    report = run(build(tmp_path, keys, Tweaks(whitelist_key=make_keys().master)), keys)
    only(report, "whitelist .cvmfswhitelist", "does not verify with the master key")


def test_whitelist_for_another_repository(tmp_path, keys):
    report = run(build(tmp_path, keys, Tweaks(whitelist_name="other.example.org")), keys)
    only(report, "whitelist .cvmfswhitelist", "'other.example.org'")


def test_manifest_signed_by_another_key(tmp_path, keys):
    report = run(build(tmp_path, keys, Tweaks(manifest_key=make_keys().repo)), keys)
    only(report, "manifest .cvmfspublished", "does not verify with the certificate's public key")


def test_tampered_manifest_field(tmp_path, keys):
    written = build(tmp_path, keys)
    path = written.root / ".cvmfspublished"
    path.write_bytes(path.read_bytes().replace(b"\nS1\n", b"\nS2\n"))
    found = lines(run(written, keys))
    assert any("printed hash" in line for line in found), found
    assert any("revision S is 2, the root catalog's revision property is 1" in line
               for line in found), found


def test_catalog_missing_from_reflog(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(reflog_omit=("C",)))
    only(run(written, keys), "reflog .cvmfsreflog",
         f"does not list the catalog {written.catalogs['/']} (manifest C) with type 0")


def test_reflog_hash_mismatch(tmp_path, keys):
    written = build(tmp_path, keys)
    db = sqlite3.connect(written.root / ".cvmfsreflog")
    db.execute("INSERT INTO refs VALUES ('00', 0, 0)")
    db.commit()
    db.close()
    only(run(written, keys), "reflog .cvmfsreflog: content hash is", "the manifest's Y is")


def test_wrong_repository_name(tmp_path, keys):
    written = build(tmp_path, keys)
    pub = keys.master_pub(tmp_path)
    report = verify_repository(open_source(str(written.root)),
                               Options(tuple(load_master_keys([pub])), repo="other.example.org"))
    only(report, "manifest .cvmfspublished", "expected 'other.example.org'")


def test_object_that_does_not_inflate(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(not_zlib=("/top.txt",)))
    only(run(written, keys), f"catalog {written.catalogs['/']}C /top.txt: object data/",
         "not a zlib stream")


def test_catalog_size_differs_from_content(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(size={"/top.txt": 4}))
    digest = written.objects["/top.txt"]
    only(run(written, keys), f"catalog {written.catalogs['/']}C /top.txt: object "
         f"data/{digest[:2]}/{digest[2:]} inflates to 3 bytes, expected 4")


def test_extended_attributes_are_counted_and_parsed(tmp_path, keys):
    good = b"\x01\x01\x04\x02user" + b"ok"
    nodes = [Node("/x/a", data=b"a", xattr=good), Node("/x/b", data=b"b", xattr=b"\x01\x02\x01")]
    written = write_repository(tmp_path / "repo", NAME, nodes, keys, nested=("/x",))
    only(run(written, keys), f"catalog {written.catalogs['/x']}C /x/b: xattr blob truncated")


def two_revisions(tmp_path: Path, keys: Keys) -> tuple[Written, Written]:
    """Revision 1 with /old.txt, then revision 2 without it, keeping revision 1 as a tag."""
    first = write_repository(tmp_path / "repo", NAME, [*NODES, Node("/old.txt", data=b"old")],
                             keys, nested=NESTED, chunk_size=4096)
    tag = ("trunk-previous", first.catalogs["/"], 1, first.root_size)
    second = write_repository(tmp_path / "repo", NAME, NODES, keys, nested=NESTED,
                              chunk_size=4096, revision=2, tweaks=Tweaks(tags=(tag,)))
    return first, second


def test_tagged_revisions_are_walked_too(tmp_path, keys):
    first, second = two_revisions(tmp_path, keys)
    report = run(second, keys)
    assert report.ok, lines(report)
    assert report.catalogs == 8  # both revisions' trees (the fixture rewrites every catalog)
    assert report.unreferenced == 1  # revision 1's history database: garbage
    object_file(second.root, first.objects["/old.txt"]).unlink()
    only(run(second, keys), f"catalog {first.catalogs['/']}C /old.txt: object", "missing")
    assert run(second, keys, tags=False).ok


def test_unreferenced_object_is_counted_not_reported(tmp_path, keys):
    written = build(tmp_path, keys)
    store(written.root, b"garbage of an older revision")
    report = run(written, keys)
    assert report.ok, lines(report)
    assert report.unreferenced == 1


def test_truncated_catalog_object_reports_every_consequence_once(tmp_path, keys):
    written = build(tmp_path, keys)
    path = object_file(written.root, written.catalogs["/sw/a"], "C")
    path.write_bytes(zlib.compress(b"garbage"))
    line = only(run(written, keys), f"catalog {written.catalogs['/sw/a']}C /sw/a")
    assert "content hash is" in line


def test_every_problem_is_collected(tmp_path, keys):
    written = build(tmp_path, keys, Tweaks(linkcount={"/sw/b/c/d": 4},
                                          counters={("/sw/a", "self_symlink"): 0},
                                          reflog_omit=("X",), whitelist_expires_in=-7200))
    object_file(written.root, written.objects["/top.txt"]).unlink()
    found = lines(run(written, keys))
    assert len(found) == 5, found


@pytest.mark.parametrize("suffix", ["", "P", "C", "X", "M", "H"])
def test_objects_in_another_zlib_compression_are_what_stratum_1s_reject(tmp_path, keys, suffix):
    """Valid zlib streams, but not zlib's default deflate (as ISA-L objects were): the genuine
    tools re-compress and compare, so the verifier does too (and only skips it when told)."""
    written = build(tmp_path, keys, Tweaks(level={suffix: 1}))
    found = lines(run(written, keys))
    assert found, "a repository stored at zlib level 1 passed"
    assert all("not stored as zlib's default deflate of its content" in line
               and "cvmfs_fsck" in line for line in found), found
    stored = [p for p in (written.root / "data").glob("*/*") if p.name[38:] == suffix]
    assert len(found) == len(stored) > 0  # each object once
    assert run(written, keys, recompress=False).ok


def test_other_compression_only_in_older_tags_is_counted_not_reported(tmp_path, keys):
    first = write_repository(tmp_path / "repo", NAME, [*NODES, Node("/old.txt", data=b"old")],
                             keys, nested=NESTED, chunk_size=4096, tweaks=Tweaks(level={"": 1}))
    tag = ("trunk-previous", first.catalogs["/"], 1, first.root_size)
    second = write_repository(tmp_path / "repo", NAME, NODES, keys, nested=NESTED,
                              chunk_size=4096, revision=2, tweaks=Tweaks(tags=(tag,)))
    report = run(second, keys)
    assert report.ok, lines(report)
    level_one = set(first.objects.values())  # the level-1 file objects only revision 1 names
    assert report.other_compression == len(level_one) == 6
    assert "6 objects only older tagged revisions use" in report.summary()
    assert run(second, keys, tags=False).other_compression == 0
