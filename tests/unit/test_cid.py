import pytest
from hypothesis import given
from hypothesis import strategies as st

from spool.names import decode_name, encode_name, is_ignored_name, split_tar_suffix
from userpub_client.cid import InvalidCid, normalize_cid, validate_cid

VALID = ["abc", "fermilab/" + "a" * 64, "dune/x.y-z_1", "a/b", "x" * 255, "g/1.tmp", "a@b"]
INVALID = [  # (as sent, the reason); the original's own words where it has the rule
    ("", "empty"),
    (".hidden", 'cid may not start with "."'),
    (".", 'cid may not start with "."'),
    ("./.x", 'cid may not start with "."'),
    ("a/.b", 'cid components may not start with "."'),
    ("a/b/c", "at most one slash allowed in cid"),
    ("a//b//c", "at most one slash allowed in cid"),
    ("/abs", 'cid may not start with "/"'),
    ("//abs", 'cid may not start with "/"'),
    ("a/..", 'cid may not contain ".." components'),
    ("a/../b", 'cid may not contain ".." components'),
    ("..", 'cid may not contain ".." components'),
    ("a'b", "disallowed character in cid"),
    ("a\\b", "disallowed character in cid"),
    ("a b", "disallowed character in cid"),
    ("a\nb", "disallowed character in cid"),
    ("a\x00b", "disallowed character in cid"),
    ("caf\u00e9", "disallowed character in cid"),
    ('a"b', "disallowed character in cid"),
    ("x" * 256, "longer than 255"),
]
NORMALISED = [  # the original's os.path.normpath: one spelling for each CID
    ("a//b", "a/b"), ("a/", "a"), ("a/b/", "a/b"), ("./a", "a"), ("a/./b", "a/b"),
    ("a///b//", "a/b"), ("dune/" + "f" * 40, "dune/" + "f" * 40),
]


@pytest.mark.parametrize(("sent", "normal"), NORMALISED)
def test_cids_are_normalised_as_the_original_does(sent, normal):
    assert normalize_cid(sent) == normal
    assert validate_cid(normal) == normal
    if sent != normal:
        with pytest.raises(InvalidCid, match="not in normal form"):
            validate_cid(sent)


@pytest.mark.parametrize("cid", VALID)
def test_valid_cids(cid):
    assert validate_cid(cid) == cid


@pytest.mark.parametrize(("cid", "reason"), INVALID)
def test_invalid_cids_have_reasons(cid, reason):
    with pytest.raises(InvalidCid, match=None) as err:
        normalize_cid(cid)
    assert str(err.value) == reason or reason in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cid", VALID)
def test_encoding_round_trip_and_never_ignored(cid):
    name = encode_name(cid)
    assert "/" not in name
    assert not is_ignored_name(name)
    assert decode_name(name) == cid


def test_tar_suffix_split():
    assert split_tar_suffix("grp%2Fabc.tar.gz") == ("grp%2Fabc", ".tar.gz")
    assert split_tar_suffix("abc.TGZ") == ("abc", ".TGZ")
    assert split_tar_suffix("abc") == ("abc", "")


def test_bad_percent_encoding():
    with pytest.raises(InvalidCid, match="percent"):
        decode_name("abc%2")
    with pytest.raises(InvalidCid):
        decode_name("a%2Fb%2Fc")


cids = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
               max_size=80)


@given(cids)
def test_property_valid_cids_round_trip(cid):
    try:
        validate_cid(cid)
    except InvalidCid:
        return
    name = encode_name(cid)
    assert decode_name(name) == cid
    assert not is_ignored_name(name)
    assert len(name.encode()) <= 255 * 3


@given(st.text(max_size=300))
def test_property_validation_never_crashes_and_accepts_only_safe(cid):
    try:
        validate_cid(cid)
    except InvalidCid as err:
        assert str(err)
        return
    parts = cid.split("/")
    assert len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)
    assert all(0x21 <= ord(c) <= 0x7E for c in cid)
