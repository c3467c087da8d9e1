"""Property-based test of the spool state machine: no sequence of drops, claims, completions,
failures, crashes and recoveries loses an accepted entry or holds one twice."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spool import DropResult, Spool, parse_name
from spool.queue import EntryWriter

REPOS = ("r1", "r2")
CIDS = st.sampled_from([f"g/c{i}" for i in range(6)] + ["x", "y"])


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-prop-"))
        self.spool = Spool(self.dir)
        self.spool.ensure_layout(REPOS)
        self.waiting: set[str] = set()     # accepted, neither done nor failed
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.claimed: dict[str, list[Path]] = {r: [] for r in REPOS}  # what a live process holds
        self.abandoned: list[EntryWriter] = []

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(cid=CIDS, data=st.binary(max_size=64))
    def drop(self, cid: str, data: bytes) -> None:
        with self.spool.writer(cid, "prop") as w:
            w.write(data)
            result = w.commit()
        in_queue = cid in self.waiting  # waiting in incoming/ or being published
        assert (result is DropResult.DUPLICATE) == in_queue
        if result is DropResult.QUEUED:
            self.waiting.add(cid)
            self.done.discard(cid)

    @rule(cid=CIDS)
    def crash_while_uploading(self, cid: str) -> None:
        writer = self.spool.writer(cid, "prop")
        writer.write(b"partial")
        self.abandoned.append(writer)  # never committed: the process died

    @rule(repo=st.sampled_from(REPOS), count=st.integers(1, 4))
    def claim(self, repo: str, count: int) -> None:
        for path in self.spool.list_incoming()[:count]:
            got = self.spool.claim(path, repo)
            if got is not None:
                self.claimed[repo].append(got)

    @precondition(lambda self: any(self.claimed.values()))
    @rule(repo=st.sampled_from(REPOS), how=st.sampled_from(["complete", "fail", "release"]))
    def finish(self, repo: str, how: str) -> None:
        if not self.claimed[repo]:
            return
        path = self.claimed[repo].pop(0)
        entry = self.spool.read_entry(path)
        if how == "complete":
            self.spool.complete(entry)
            self.waiting.discard(entry.cid)
            self.done.add(entry.cid)
        elif how == "fail":
            self.spool.fail(entry, "bad tarball")
            self.waiting.discard(entry.cid)
            self.failed.add(entry.cid)
        else:
            self.spool.release(entry)

    @rule(repo=st.sampled_from(REPOS))
    def crash_and_recover(self, repo: str) -> None:
        self.claimed[repo] = []      # the publisher died holding these
        self.spool.recover(repo)     # its successor returns them to incoming/
        for writer in self.abandoned:
            writer._fd = None        # the fd died with the process
        self.abandoned.clear()
        self.spool.clean_tmp(-1)     # leftovers past their grace period

    @invariant()
    def every_waiting_entry_exactly_once(self) -> None:
        names = [p.name for p in self.spool.list_incoming()]
        for repo in REPOS:
            names += [p.name for p in self.spool.iter_active(repo)]
        cids = [parse_name(n)[0] for n in names]
        assert sorted(cids) == sorted(self.waiting), (cids, self.waiting)

    @invariant()
    def failures_are_kept_with_reasons(self) -> None:
        for cid in self.failed - self.waiting:
            status = self.spool.status(cid)
            assert status.reason == "bad tarball"


TestSpoolMachine = SpoolMachine.TestCase
TestSpoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
