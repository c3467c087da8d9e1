"""The spool state machine with crashes *inside* its transitions.

:class:`CrashingSpoolMachine` extends the state machine of ``test_spool_properties`` (drops,
claims, completions, failures, releases, crashes between transitions, recoveries) with:

* a crash at any point inside a drop, a claim, a completion, a failure, a release or a
  recovery: the process dies before its k-th side-effecting call (every ``os`` call of
  :mod:`spool.queue`, and its renames, fsyncs and removals); from then on nothing it would
  still do happens (no ``finally`` or ``__exit__`` cleanup reaches the disk either);
* plain-file entries, as operators drop them (``mv code.tar.gz incoming/<cid>.tar.gz``);
* CIDs whose spool names are too long to be their percent-encoding.

After a crash the entry of the interrupted transition may be in its old state or its new
one, never lost (a failure is kept, or the entry waits to be retried) and never twice; every
other accepted entry is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

import spool.queue as queue
from spool import BadEntry, Kind, Spool, entry_name
from spool.names import encode_name
from tests.unit.test_spool_properties import CIDS, REPOS, SpoolMachine

OPERATOR_CIDS = st.sampled_from(["ops/o1", "ops/o2", "ops/o3"])
LONG_CIDS = st.sampled_from(["!" * 120, "x" * 255, "g/" + "~" * 253])
ANY_CID = st.one_of(CIDS, LONG_CIDS)
POINT = st.integers(0, 14)
SIDE_EFFECTS = ("open", "write", "fsync", "close", "rename", "link", "unlink", "mkdir")


class Crash(BaseException):
    """The process was killed here."""


class _DyingOs:
    """``os`` for :mod:`spool.queue` whose side-effecting calls die from the k-th on."""

    def __init__(self, real: Any, dying: _Dying) -> None:
        self._real = real
        self._dying = dying

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        return self._dying.wrap(value, name) if name in SIDE_EFFECTS else value


class _Dying:
    def __init__(self, k: int) -> None:
        self.left = k
        self.dead = False
        self.fds: list[int] = []

    def wrap(self, func: Any, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead or self.left == 0:
                self.dead = True
                raise Crash(name)
            self.left -= 1
            result = func(*args, **kwargs)
            if name == "open":
                self.fds.append(result)
            return result

        return call


@contextlib.contextmanager
def dying_at(k: int) -> Iterator[_Dying]:
    """Run the body as a process killed before its k-th side effect in spool.queue (or not
    at all, if the body makes fewer). Its open file descriptors die with it."""
    dying = _Dying(k)
    saved = {name: getattr(queue, name) for name in
             ("os", "rename_noreplace", "fsync_dir", "remove_tree")}
    setattr(queue, "os", _DyingOs(os, dying))  # noqa: B010 (a module's global)
    for name in ("rename_noreplace", "fsync_dir", "remove_tree"):
        setattr(queue, name, dying.wrap(saved[name], name))
    try:
        yield dying
    except Crash:
        pass
    finally:
        for name, value in saved.items():
            setattr(queue, name, value)
        if dying.dead:
            for fd in dying.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def cid_of(spool: Spool, path: Path) -> str:
    return spool.read_entry(path).cid


def whereabouts(spool: Spool, cid: str) -> tuple[int, float]:
    """How many entries of ``cid`` wait (incoming/ and active/), and when it last failed."""
    paths = spool.list_incoming()
    for repo in REPOS:
        paths += list(spool.iter_active(repo))
    waiting = 0
    for path in paths:
        with contextlib.suppress(BadEntry, FileNotFoundError):
            waiting += cid_of(spool, path) == cid
    try:
        reason = json.loads((spool.failed / entry_name(cid, Kind.PUBLISH) / queue.REASON)
                            .read_text())
        failed_at = float(reason["time"])
    except (OSError, ValueError, KeyError):
        failed_at = 0.0
    return waiting, failed_at


class CrashingSpoolMachine(SpoolMachine):
    @rule(cid=OPERATOR_CIDS, data=st.binary(max_size=32))
    def operator_drop(self, cid: str, data: bytes) -> None:
        if cid in self.waiting:
            return
        part = self.spool.tmp / f"{encode_name(cid)}.part"
        part.write_bytes(data)
        os.rename(part, self.spool.incoming / f"{encode_name(cid)}.tar.gz")
        self.waiting.add(cid)
        self.done.discard(cid)

    @rule(cid=LONG_CIDS, data=st.binary(max_size=16))
    def drop_long(self, cid: str, data: bytes) -> None:
        self.drop(cid, data)

    def _settle(self, cid: str, allowed: set[str], since: float) -> None:
        """Update the model from the disk for ``cid``, whose transition (begun at ``since``)
        was cut short; ``allowed`` are its possible outcomes: waiting, failed, gone."""
        waiting, failed_at = whereabouts(self.spool, cid)
        assert waiting <= 1, f"{cid} waits twice after a crash"
        if waiting:
            state = "waiting"
        elif failed_at >= since and "failed" in allowed:
            state = "failed"
        else:
            state = "gone"
        assert state in allowed, f"{cid} is {state} after a crash (allowed: {allowed})"
        if state == "waiting":
            self.waiting.add(cid)
            self.done.discard(cid)
        elif state == "failed":
            self.waiting.discard(cid)
            self.failed.add(cid)
        else:
            self.waiting.discard(cid)
            self.done.add(cid)

    @rule(cid=ANY_CID, data=st.binary(max_size=32), k=POINT)
    def crash_inside_drop(self, cid: str, data: bytes, k: int) -> None:
        was_waiting, since = cid in self.waiting, time.time()
        with dying_at(k):
            writer = self.spool.writer(cid, "prop")
            writer.write(data)
            writer.commit()
        if was_waiting or whereabouts(self.spool, cid)[0]:
            self._settle(cid, {"waiting"}, since)

    @rule(repo=st.sampled_from(REPOS), count=st.integers(1, 3), k=POINT)
    def crash_inside_claim(self, repo: str, count: int, k: int) -> None:
        paths = self.spool.list_incoming()[:count]
        cids, since = [cid_of(self.spool, p) for p in paths], time.time()
        with dying_at(k):
            for path in paths:
                self.spool.claim(path, repo)
        self.claimed[repo] = []  # the publisher died with what it held
        for cid in cids:
            self._settle(cid, {"waiting"}, since)

    @precondition(lambda self: any(self.claimed.values()))
    @rule(repo=st.sampled_from(REPOS), how=st.sampled_from(["complete", "fail", "release"]),
          k=POINT)
    def crash_inside_finish(self, repo: str, how: str, k: int) -> None:
        if not self.claimed[repo]:
            return
        path = self.claimed[repo].pop(0)
        entry, since = self.spool.read_entry(path), time.time()
        with dying_at(k):
            if how == "complete":
                self.spool.complete(entry)
            elif how == "fail":
                self.spool.fail(entry, "bad tarball")
            else:
                self.spool.release(entry)
        self.claimed[repo] = []
        allowed = {"complete": {"waiting", "gone"}, "fail": {"waiting", "failed"},
                   "release": {"waiting"}}[how]
        self._settle(entry.cid, allowed, since)

    @rule(repo=st.sampled_from(REPOS), k=POINT)
    def crash_inside_recover(self, repo: str, k: int) -> None:
        cids = [cid_of(self.spool, p) for p in self.spool.iter_active(repo)]
        self.claimed[repo], since = [], time.time()
        with dying_at(k):
            self.spool.recover(repo)
        for cid in cids:
            self._settle(cid, {"waiting"}, since)

    @invariant()
    def every_waiting_entry_exactly_once(self) -> None:
        # (overrides the parent's: names of long CIDs do not decode; meta.json tells)
        paths = self.spool.list_incoming()
        for repo in REPOS:
            paths += list(self.spool.iter_active(repo))
        cids = sorted(cid_of(self.spool, p) for p in paths)
        assert cids == sorted(self.waiting), (cids, self.waiting)


TestCrashingSpoolMachine = CrashingSpoolMachine.TestCase
TestCrashingSpoolMachine.settings = settings(max_examples=120, stateful_step_count=40,
                                             deadline=None)


# -- the same, spelled out for the failure of an operator's plain-file entry ---------------


@pytest.mark.parametrize("k", range(12))
def test_a_crash_while_failing_a_plain_file_entry_never_loses_it(tmp_path: Path, k: int) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout(("r1",))
    (spool.incoming / "ops%2Fplain.tar.gz").write_bytes(b"not a tarball")
    claimed = spool.claim(spool.incoming / "ops%2Fplain.tar.gz", "r1")
    assert claimed is not None
    entry = spool.read_entry(claimed)
    with dying_at(k):
        spool.fail(entry, "not a tar archive")
    spool.recover("r1")  # the next publisher
    spool.clean_tmp(-1)  # and later the janitor
    failed = spool.status("ops/plain").reason == "not a tar archive"
    waiting = [p.name for p in spool.list_incoming()] == ["ops%2Fplain.tar.gz"]
    assert failed or waiting, f"the entry is lost: {os.listdir(spool.root / 'failed')}"
    if waiting:
        assert spool.read_entry(spool.incoming / "ops%2Fplain.tar.gz").size == 13
