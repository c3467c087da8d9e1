"""Objects compressed byte for byte as CernVM-FS compresses them, and the content index.

The genuine reference is ``cvmfs_swissknife zpipe`` (cvmfs's own deflate loop with its bundled
zlib, the setup ``cvmfs_fsck`` and ``pull`` re-compress with); skipped when the tools are absent.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import zlib

import pytest
from isal import isal_zlib

from publisher.repositories.cvmfs_native.chunking import ChunkParams
from publisher.repositories.cvmfs_native.compression import (
    REFERENCE_SHA1,
    compress,
    compressor_problem,
    is_canonical,
    reference_input,
)
from publisher.repositories.cvmfs_native.objects import ObjectPipeline, ObjectStore
from tests.cvmfs_genuine import swissknife


def samples() -> dict[str, bytes]:
    rng = random.Random(7)
    text = b"".join(b"%d: a line of text that repeats a little\n" % i for i in range(60_000))
    return {"empty": b"", "one byte": b"x", "16 KiB - 1": text[:16383], "16 KiB": text[:16384],
            "16 KiB + 1": text[:16385], "random": rng.randbytes(200_000), "text": text,
            "zeros": bytes(1 << 20), "mixed": rng.randbytes(50_000) + text[:300_000] + bytes(9999),
            "reference": reference_input()}


@pytest.mark.parametrize("name", list(samples()))
def test_compress_makes_what_the_genuine_tools_make(name):
    data = samples()[name]
    assert compress(data) == swissknife("zpipe", stdin=data)


def test_the_pinned_reference_is_the_genuine_stream():
    assert hashlib.sha1(swissknife("zpipe", stdin=reference_input())).hexdigest() == REFERENCE_SHA1


def test_other_compressors_are_refused_at_startup():
    assert compressor_problem() is None
    for other in (lambda d: bytes(isal_zlib.compress(d, 1)), lambda d: zlib.compress(d, 1),
                  lambda d: zlib.compress(d, 9)):
        problem = compressor_problem(other)
        assert problem is not None and "stratum 1s and cvmfs_fsck would reject" in problem


def test_output_does_not_depend_on_how_the_input_is_cut():
    """What lets the tools (16 KiB reads), we (one call) and the verifier (streaming) agree."""
    data = samples()["mixed"]
    for piece in (1, 777, 16384, 100_000):
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION)
        out = b"".join(deflater.compress(data[i:i + piece]) for i in range(0, len(data), piece))
        assert out + deflater.flush() == compress(data)
    assert is_canonical(compress(data), data)
    assert not is_canonical(bytes(isal_zlib.compress(data, 1)), data)


def test_stored_content_is_not_compressed_again(tmp_path):
    store = ObjectStore(tmp_path)
    store.ensure_layout()
    index = store.index(create=True)
    assert index is not None
    items = [(b"a" * 5000, ""), (b"b" * 5000, "P"), (b"a" * 5000, "P"), (b"a" * 5000, "")]
    first = store.put_many(items)
    assert [o.compressed for o in first] == [True, True, True, False]  # the 4th: same as the 1st
    again = store.put_many(items)
    assert [o.compressed for o in again] == [False] * 4
    assert [o.digest for o in again] == [o.digest for o in first]
    gone = first[0]
    store.path(gone.hex).unlink()  # e.g. garbage collected: compressed (and stored) again
    assert store.put_data(b"a" * 5000).compressed and store.path(gone.hex).exists()
    store.path(first[1].hex, "P").write_bytes(b"truncated")  # wrong size: not trusted
    assert store.put_data(b"b" * 5000, "P").compressed
    assert store.get(first[1].hex, "P") == b"b" * 5000
    index.forget([first[1].digest])
    assert index.lookup([(hashlib.sha256(b"b" * 5000).digest(), "P")]) == {}


def test_worker_processes_use_the_index(tmp_path):
    store = ObjectStore(tmp_path)
    store.ensure_layout()
    store.index(create=True)
    rng = random.Random(3)
    files = [rng.randbytes(n) for n in (10, 5000, 70_000)]
    big = rng.randbytes(600_000)
    params = ChunkParams(64 << 10, 128 << 10, 256 << 10)
    results = []
    for _ in range(2):
        pipeline = ObjectPipeline(store, processes=2, batch_count=2)
        tickets = [pipeline.submit(f) for f in files]
        chunked = pipeline.submit_file(big, params)
        pipeline.close()
        results.append(([t.result() for t in tickets], chunked.result()))
    (small1, chunks1), (small2, chunks2) = results
    assert len(chunks1) > 2 and all(o.compressed for o in small1)
    assert not any(o.compressed for o in small2) and not any(o.compressed for _, o in chunks2)
    assert [o.digest for _, o in chunks2] == [o.digest for _, o in chunks1]


def test_an_unusable_index_is_started_afresh(tmp_path):
    store = ObjectStore(tmp_path)
    store.ensure_layout()
    store.index_path.parent.mkdir(parents=True)
    store.index_path.write_bytes(b"not a database" * 100)
    index = store.index(create=True)
    assert index is not None and index.count() == 0
    store.put_data(b"kept")
    assert index.count() == 1
    store.close_index()
    with sqlite3.connect(store.index_path) as conn:  # entries of another compressor
        conn.execute("UPDATE properties SET value = 'isal-1' WHERE key = 'compressor'")
    fresh = ObjectStore(tmp_path).index(create=True)
    assert fresh is not None and fresh.count() == 0


def test_garbage_collection_forgets_what_it_deletes(tmp_path):
    from publisher.repositories.cvmfs_native import NativeRepository, init_keys
    from publisher.tarball.unpack import UnpackLimits
    from tests.helpers import make_tarball

    fqrn = "repo.example.org"
    repo = NativeRepository(fqrn, tmp_path / "srv", "sw", "ts", f"/cvmfs/{fqrn}",
                            keys=init_keys(tmp_path / "keys", fqrn), durable=False, keep_hours=0)
    repo.recover()
    doomed = b"content of a removed cid\n" * 99
    key = (hashlib.sha256(doomed).digest(), "")
    for cid, content in (("a", doomed), ("b", b"other")):
        with repo.transaction() as txn:
            txn.add(cid, make_tarball(tmp_path / f"{cid}.tgz", {"f": content}), "me",
                    UnpackLimits())
    index = repo.store.index()
    assert index is not None and key in index.lookup([key])
    with repo.transaction() as txn:
        txn.remove(["a"])
    with repo.transaction() as txn:
        txn.stamp(["b"], "me")  # trunk-previous no longer names "a"
    repo.gc()
    assert not repo.store.path(hashlib.sha1(compress(doomed)).hexdigest()).exists()
    assert index.lookup([key]) == {}


def test_publishing_goes_on_without_an_index(tmp_path, caplog):
    store = ObjectStore(tmp_path)
    store.ensure_layout()
    store.index_path.mkdir(parents=True)  # not a database, and not removable as a file
    assert store.index(create=True) is None
    assert "no content index" in caplog.text
    stored = store.put_data(b"still stored")
    assert stored.compressed and store.get(stored.hex) == b"still stored"
