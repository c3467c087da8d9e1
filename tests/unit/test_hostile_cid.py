"""Property-based tests of the CID rules against hostile and extreme CIDs (extending
``test_cid``): every CID the rules accept, up to 255 characters of any allowed character,
has spool names that fit in one file name and never collide, decodes back to itself or not
at all, and names a directory strictly inside the repository's CID directory."""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spool import BadEntry, Kind, Spool, State, entry_name, parse_name
from spool.names import is_ignored_name
from spool.queue import NAME_MAX
from userpub_client.cid import MAX_CID_LENGTH, InvalidCid, validate_cid

ALLOWED = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "'\\\"`/")
# Weighted towards the characters that grow threefold when percent-encoded.
SPECIAL = "".join(c for c in ALLOWED if c not in string.ascii_letters + string.digits + "-_.+=,~")


def component(max_size: int) -> st.SearchStrategy[str]:
    chars = st.sampled_from(ALLOWED) | st.sampled_from(SPECIAL)
    return st.text(chars, min_size=1, max_size=max_size).filter(
        lambda c: not c.startswith("."))


valid_cids = st.one_of(
    component(MAX_CID_LENGTH),
    st.tuples(component(127), component(127)).map("/".join),
).filter(lambda c: len(c) <= MAX_CID_LENGTH)
longest_cids = st.one_of(
    st.text(st.sampled_from(SPECIAL), min_size=MAX_CID_LENGTH, max_size=MAX_CID_LENGTH)
    .filter(lambda c: not c.startswith(".")),
    st.tuples(component(127), component(127)).map("/".join).filter(lambda c: len(c) >= 200),
)


@given(st.one_of(valid_cids, longest_cids))
def test_valid_cids_are_valid(cid: str) -> None:
    assert validate_cid(cid) == cid


@given(st.one_of(valid_cids, longest_cids), st.sampled_from(list(Kind)))
def test_spool_names_fit_in_a_file_name_and_are_never_ignored(cid: str, kind: Kind) -> None:
    name = entry_name(cid, kind)
    assert len(name.encode()) <= NAME_MAX
    assert "/" not in name and "\0" not in name
    assert not is_ignored_name(name)
    assert all(0x21 <= ord(c) <= 0x7E for c in name)


@given(st.one_of(valid_cids, longest_cids), st.sampled_from(list(Kind)))
def test_spool_names_decode_to_their_cid_or_not_at_all(cid: str, kind: Kind) -> None:
    name = entry_name(cid, kind)
    try:
        assert parse_name(name) == (cid, kind)
    except BadEntry:
        assert "%%" in name  # a shortened name: its meta.json names the CID


@given(st.one_of(valid_cids, longest_cids), st.one_of(valid_cids, longest_cids),
       st.sampled_from(list(Kind)))
def test_different_cids_never_share_a_spool_name(a: str, b: str, kind: Kind) -> None:
    assume(a != b)
    assert entry_name(a, kind) != entry_name(b, kind)
    assert entry_name(a, Kind.PUBLISH) != entry_name(b, Kind.STAMP)


@given(st.one_of(valid_cids, longest_cids))
def test_a_cid_names_a_directory_strictly_inside_the_cid_directory(cid: str) -> None:
    base = "/cvmfs/repo/sw"
    path = os.path.normpath(os.path.join(base, cid))
    assert path.startswith(base + "/") and path != base
    assert os.path.relpath(path, base) == cid  # nothing was normalised away
    assert len(cid.split("/")) <= 2 and all(0 < len(p) <= 255 for p in cid.split("/"))


@given(st.text(st.characters(codec="utf-8"), max_size=300) |
       st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_whatever_a_query_string_decodes_to_is_refused_or_safe(raw: str) -> None:
    try:
        cid = validate_cid(raw)
    except InvalidCid as err:
        assert str(err) and "\n" not in str(err)
        return
    assert cid == raw and ".." not in cid.split("/") and not cid.startswith(("/", "."))
    assert not any(c in cid for c in "'\\\"`\0\n ")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(valid_cids, longest_cids), min_size=1, max_size=6, unique=True))
def test_every_valid_cid_goes_through_the_spool(cids: list[str]) -> None:
    """Queued, stamped, claimed, failed and seen by status(), on a real filesystem."""
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp))
        spool.ensure_layout(("r1",))
        for cid in cids:
            with spool.writer(cid, "prop") as w:
                w.write(cid.encode())
                w.commit()
            spool.drop_stamp(cid, "prop")
            assert spool.status(cid).state is State.QUEUED
        for path in spool.list_incoming():
            claimed = spool.claim(path, "r1")
            assert claimed is not None
            entry = spool.read_entry(claimed)
            assert entry.cid in cids
            if entry.kind is Kind.PUBLISH:
                assert entry.payload.read_bytes() == entry.cid.encode()
                assert spool.status(entry.cid).state is State.PUBLISHING
                spool.fail(entry, f"failed {entry.cid}")
            else:
                spool.complete(entry)
        for cid in cids:
            status = spool.status(cid)
            assert (status.state, status.reason) == (State.FAILED, f"failed {cid}")
