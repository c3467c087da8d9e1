"""The judge of uploads (ingest/upload_check.py): the publisher's verdict, while the bytes arrive."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ingest.upload_check import PREFIX_BYTES, UploadCheck
from publisher.tarball import UnpackError, UnpackLimits
from publisher.tarball.unpack import unpack
from tests.hostile import (
    CASE_LIMITS,
    EXPECTED_ERRORS,
    HOSTILE_CASES,
    KEPT_CASES,
    compress,
    dir_,
    reg,
    sym,
    tar_bytes,
)

ROOT_LEN = len(b"/cvmfs/repo.example.org/sw/grp/0123456789abcdef/")


def judged(data: bytes, limits: UnpackLimits = UnpackLimits(), piece: int = 1 << 20  # noqa: B008
           ) -> str | None:
    check = UploadCheck(limits, ROOT_LEN)
    for start in range(0, len(data), piece):
        check.feed(memoryview(data)[start:start + piece])
        if check.problem is not None:
            check.abort()
            return check.problem
    return check.finish()


@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_every_hostile_tarball_fails_with_the_publishers_reason(tmp_path, case):
    src = HOSTILE_CASES[case](tmp_path)
    limits = UnpackLimits(**CASE_LIMITS.get(case, {}))
    with pytest.raises(UnpackError) as unpacked:
        unpack(src, tmp_path / "dest", limits)
    threads = threading.active_count()
    problem = judged(src.read_bytes(), limits)
    assert problem is not None and EXPECTED_ERRORS[case] in problem
    if "bzip2" not in case:  # the publisher decodes bzip2 with lbzip2, whose words differ
        assert problem == str(unpacked.value)
    assert threading.active_count() == threads  # the judge's thread is gone


@pytest.mark.parametrize("case", sorted(KEPT_CASES))
def test_tarballs_the_publisher_keeps_pass(tmp_path, case):
    assert judged(KEPT_CASES[case](tmp_path).read_bytes()) is None


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz", "zstd", "none"])
@pytest.mark.parametrize("piece", [1, 700, 4096, 1 << 20])
def test_valid_tarballs_pass_in_any_pieces(compression, piece):
    entries = [dir_("bin/"), reg("bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
               sym("bin/python", "/usr/bin/python3"), reg("data/big", os.urandom(300_000))]
    data = compress(tar_bytes(entries), compression)
    if piece == 1 and len(data) > 20_000:
        piece = 97  # byte by byte would take long; still smaller than any header
    assert judged(data, piece=piece) is None


def test_a_problem_found_early_stops_the_upload_early():
    bad = tar_bytes([reg("/etc/passwd", b"x")]) + os.urandom(8 << 20)  # the rest is never read
    check = UploadCheck(UnpackLimits(), ROOT_LEN)
    fed = 0
    while check.problem is None and fed < len(bad):
        check.feed(bad[fed:fed + (64 << 10)])
        fed += 64 << 10
        time.sleep(0.001)
        if fed > len(bad) // 2:
            break
    deadline = time.monotonic() + 30
    while check.problem is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert check.problem == "member '/etc/passwd': absolute path"
    check.abort()


def test_bzip2_and_xz_are_judged_on_their_first_megabytes_only():
    tail_bad = [reg("noise", os.urandom(PREFIX_BYTES + (1 << 20))), reg("/abs", b"x")]
    for compression in ("bzip2", "xz"):
        assert judged(compress(tar_bytes(tail_bad), compression)) is None  # publisher's call
        head_bad = [reg("/abs", b"x"), reg("noise", b"y")]
        assert judged(compress(tar_bytes(head_bad), compression)) == "member '/abs': absolute path"
    assert judged(compress(tar_bytes(tail_bad), "gzip")) == "member '/abs': absolute path"


def test_empty_and_tiny_uploads():
    assert judged(b"") == "empty file"
    assert "not a tar archive" in (judged(b"hello") or "")


def test_abort_returns_while_the_judge_waits_for_more():
    check = UploadCheck(UnpackLimits(), ROOT_LEN)
    check.feed(compress(tar_bytes([reg("a", os.urandom(5 << 20))]), "gzip")[:200_000])
    started = time.monotonic()
    check.abort()
    assert time.monotonic() - started < 30


def test_head_mode_judges_every_upload_on_its_first_megabytes():
    tail_bad = compress(tar_bytes([reg("noise", os.urandom(PREFIX_BYTES + (1 << 20))),
                                   reg("/abs", b"x")]), "gzip")
    head = UploadCheck(UnpackLimits(), ROOT_LEN, whole=False)
    for start in range(0, len(tail_bad), 1 << 20):
        head.feed(tail_bad[start:start + (1 << 20)])
    assert head.finish() is None  # the publisher's call
    head_bad = compress(tar_bytes([reg("/abs", b"x")]), "gzip")
    check = UploadCheck(UnpackLimits(), ROOT_LEN, whole=False)
    check.feed(head_bad)
    assert check.finish() == "member '/abs': absolute path"
