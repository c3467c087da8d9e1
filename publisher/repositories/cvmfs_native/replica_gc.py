"""Garbage collection of a replica: delete what no revision it still serves reaches.

After the origin's own collection (its ``.cvmfs_status.json`` ``last_gc`` changed) the replica
holds objects the origin has deleted. :func:`collect_replica` keeps everything reachable from
the current manifest (its catalogs, the objects and chunks they name, its history, certificate
and meta-info), from the revisions its history tags, and from the revisions the replica served
until less than the grace period ago (a reader may be walking one); objects written within the
grace period stay too. Everything else in ``data/`` goes. The caller holds the replica's lock.

:func:`collect_if_due` runs it when the origin's ``last_gc`` differs from the one seen at the
last collection, once more when the grace of what that run kept has ended, and at least daily.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from publisher.repositories.cvmfs_native.objects import (
    CATALOG,
    CERTIFICATE,
    HISTORY,
    METAINFO,
    ObjectStore,
)
from publisher.repositories.cvmfs_native.replica_objects import (
    nested,
    opened,
    read_local_manifest,
    references,
    tagged_roots,
)
from publisher.repositories.cvmfs_native.replica_state import ReplicaState
from publisher.repositories.cvmfs_native.replica_trust import ReplicaError

PERIOD_SECONDS = 86400.0  # collect at least daily, whatever the origin says


@dataclass(frozen=True)
class ReplicaGcResult:
    """What one collection did."""

    repository: str
    removed: int
    freed_bytes: int
    kept: int
    revisions_kept: int  # the current one, tagged ones and replaced ones within the grace
    seconds: float


def reachable_names(store: ObjectStore, roots: Iterable[str]) -> set[str]:
    """``<hex><suffix>`` of every object reachable from these root catalogs.

    A root that is absent is skipped (a tag whose revision the origin had already collected);
    a missing catalog below a present one is an error (the replica is not what it should be).
    """
    names: set[str] = set()
    stack = [(root, True) for root in roots]
    while stack:
        digest, is_root = stack.pop()
        name = digest + CATALOG
        if name in names:
            continue
        path = store.path(digest, CATALOG)
        if not path.exists():
            if is_root:
                continue
            raise ReplicaError(f"catalog {name} is missing below a stored catalog: not "
                               "collecting an inconsistent replica")
        names.add(name)
        with opened(path, store.temp_path("gc.db"), "catalog") as conn:
            names.update(h + s for h, s in references(conn))
            stack.extend((child, False) for child in nested(conn))
    return names


def gc_due(state: ReplicaState, origin_last_gc: str, now: float) -> bool:
    """True when the replica should be collected now."""
    if origin_last_gc and origin_last_gc != state.origin_last_gc:
        return True
    return state.gc_next_due > 0 and now >= state.gc_next_due


def collect_if_due(root: Path, state_path: Path, repository: str, origin_last_gc: str, *,
                   grace: float, clock: Callable[[], float] = time.time
                   ) -> ReplicaGcResult | None:
    """Collect the replica if :func:`gc_due`; schedule the first periodic run otherwise."""
    now = clock()
    state = ReplicaState.load(state_path, repository)
    if not gc_due(state, origin_last_gc, now):
        if state.gc_next_due <= 0:
            state.gc_next_due = now + PERIOD_SECONDS
            state.save(state_path)
        return None
    return collect_replica(root, state_path, repository, grace=grace, clock=clock,
                           origin_last_gc=origin_last_gc)


def collect_replica(root: Path, state_path: Path, repository: str, *, grace: float,
                    clock: Callable[[], float] = time.time, origin_last_gc: str = ""
                    ) -> ReplicaGcResult:
    """Delete the replica's unreachable objects (see the module docstring)."""
    started = time.monotonic()
    now = clock()
    store = ObjectStore(root)
    local = read_local_manifest(root)
    state = ReplicaState.load(state_path, repository)
    if local is None:
        return ReplicaGcResult(repository, 0, 0, 0, 0, time.monotonic() - started)
    manifest = local[1]
    roots = {manifest.root_catalog}
    keep = {f"{h}{s}" for h, s in ((manifest.certificate, CERTIFICATE),
                                   (manifest.history, HISTORY), (manifest.metainfo, METAINFO))
            if h}
    history = store.path(manifest.history, HISTORY) if manifest.history else None
    if history is not None and history.exists():
        with opened(history, store.temp_path("gc-history.db"), "history") as conn:
            roots.update(tagged_roots(conn))
    retained = [r for r in state.retained if r.until > now]
    for kept in retained:
        roots.add(kept.root_catalog)
        keep.update(kept.objects)
    keep |= reachable_names(store, roots)
    young = now - grace
    removed = freed = 0
    for name, path in store.names():
        if name in keep:
            continue
        try:
            st = os.lstat(path)
            if st.st_mtime > young:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        freed += st.st_size
    state.retained = retained
    state.gc_last_run = now
    # after the origin's collection: once more when the grace of what was kept has ended
    # (what the origin deleted can go then); else daily
    after_origin = bool(origin_last_gc) and origin_last_gc != state.origin_last_gc
    follow_up = [r.until for r in retained] if after_origin else []
    state.gc_next_due = min([max(follow_up, default=now + PERIOD_SECONDS), now + PERIOD_SECONDS])
    state.origin_last_gc = origin_last_gc or state.origin_last_gc
    state.save(state_path)
    return ReplicaGcResult(repository, removed, freed, len(keep), len(roots),
                           time.monotonic() - started)
