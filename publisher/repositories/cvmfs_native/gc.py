"""Garbage collection: which stored objects the kept revisions still reach.

A revision reaches its root catalog, every catalog below it (``nested_catalogs``), every
file content object named in a catalog row (no suffix) and every chunk (``P``). The manifest
additionally reaches its history (``H``), certificate (``X``) and meta-info (``M``) objects;
only the current manifest's are kept (older manifests are no longer served).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from publisher.repositories.cvmfs_native.history import AUTO_PREFIX, Tag
from publisher.repositories.cvmfs_native.objects import CATALOG, PARTIAL, ObjectStore


def reachable(store: ObjectStore, roots: Iterable[str]) -> set[str]:
    """Names (``<hex><suffix>``) of every object reachable from these root catalogs."""
    names: set[str] = set()
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        names.add(digest + CATALOG)
        conn = sqlite3.connect(":memory:")
        try:
            conn.deserialize(store.get(digest, CATALOG))
            for (blob,) in conn.execute("SELECT hash FROM catalog WHERE hash IS NOT NULL"):
                names.add(bytes(blob).hex())
            for (blob,) in conn.execute("SELECT hash FROM chunks"):
                names.add(bytes(blob).hex() + PARTIAL)
            stack.extend(h for (h,) in conn.execute("SELECT sha1 FROM nested_catalogs"))
        finally:
            conn.close()
    return names


def expired(tag: Tag, keep_after: int) -> bool:
    """An automatic tag older than the retention window (``trunk*`` and named tags stay)."""
    return tag.name.startswith(AUTO_PREFIX) and tag.timestamp < keep_after


def kept_roots(tags: Iterable[Tag], current_root: str, keep_after: int) -> set[str]:
    """Root catalogs of the revisions a collection keeps (before the GC revision is written).

    The current revision becomes ``trunk-previous`` of the GC revision, so it is always kept;
    the old ``trunk``/``trunk-previous`` tags are replaced, and automatic tags are kept while
    younger than the window.
    """
    roots = {current_root}
    for tag in tags:
        if tag.name.startswith(AUTO_PREFIX):
            keep = not expired(tag, keep_after)
        else:
            keep = tag.name not in ("trunk", "trunk-previous")
        if keep:
            roots.add(tag.root_hash)
    return roots
