"""Walking every catalog reachable from the root and checking each one (spec §6, §7, §8, §10).

Per catalog: the object (hash, inflate, size), schema and properties, the root entry (and its
equality with the parent's transition row), the rows (:mod:`rows`), the nested catalog
registrations, and all 24 statistics counters (self and subtree). Content objects are only
collected here; :mod:`verify` re-hashes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cvmfs_verify.catalog import (
    COUNTERS,
    FLAG_NESTED_ROOT,
    Catalog,
    DatabaseError,
    Entry,
    display,
)
from cvmfs_verify.fetch import BadObjectError, FetchError, NotFoundError
from cvmfs_verify.hashes import (
    SUFFIX_CATALOG,
    ContentHash,
    HashError,
    md5_pair,
    parent_path,
)
from cvmfs_verify.report import ObjectRef, Report
from cvmfs_verify.rows import Counters, RowChecker, differences

#: Fetch and open a catalog object; raises NotFoundError/BadObjectError/FetchError/DatabaseError.
CatalogLoader = Callable[[ContentHash], Catalog]


def _zero() -> Counters:
    return dict.fromkeys(COUNTERS, 0)


@dataclass(frozen=True)
class Mount:
    """A catalog to inspect: its hash, mountpoint, expected size, and the parent's transition row."""

    hash: ContentHash
    path: bytes
    size: int | None
    size_from: str
    transition: Entry | None


@dataclass(frozen=True)
class RootInfo:
    """Properties of a root catalog that the manifest and the history must agree with."""

    revision: int | None
    ttl: int | None


@dataclass(frozen=True)
class _Inspected:
    path: bytes
    counters: Counters | None
    root: Entry | None


class CatalogWalker:
    """Checks catalog trees (of one or more revisions), adding problems and object references.

    A catalog shared by several revisions is inspected once; later references only compare
    their transition row with its root row and reuse its counters.
    """

    def __init__(self, report: Report, load: CatalogLoader,
                 add_object: Callable[[ObjectRef], None]) -> None:
        self.report = report
        self._load = load
        self._add_object = add_object
        self._rows = RowChecker(report, add_object)
        self._inspected: dict[ContentHash, _Inspected] = {}
        self._roots: dict[ContentHash, RootInfo] = {}

    def walk(self, root: ContentHash, size: int | None, size_from: str) -> RootInfo | None:
        """Inspect a root catalog and, depth first, every nested catalog below it."""
        self._inspect(Mount(root, b"", size, size_from, None))
        return self._roots.get(root)

    # -- one catalog -----------------------------------------------------------------------

    def _inspect(self, mount: Mount) -> Counters | None:
        """Check one catalog and its nested ones; return its self+subtree counters."""
        where = f"{_label(mount.hash)} {display(mount.path)}"
        if (done := self._inspected.get(mount.hash)) is not None:
            if done.path != mount.path:
                self.report.add(where, f"the same catalog is also mounted at {display(done.path)}")
            elif mount.transition is not None and done.root is not None:
                for what in differences(mount.transition, done.root):
                    self.report.add(where, "transition row in the parent and nested root row "
                                           f"differ: {what}")
            return done.counters
        self._inspected[mount.hash] = _Inspected(mount.path, None, None)
        self._add_object(ObjectRef(mount.hash, SUFFIX_CATALOG, True, None, where, loaded=True))
        try:
            catalog = self._load(mount.hash)
        except NotFoundError as err:
            self.report.add(where, f"catalog object {err} missing")
            return None
        except (BadObjectError, FetchError, DatabaseError) as err:
            self.report.add(where, f"cannot load catalog: {err}")
            return None
        try:
            counters, root = self._check(catalog, mount, where)
            self._inspected[mount.hash] = _Inspected(mount.path, counters, root)
            return counters
        except DatabaseError as err:
            self.report.add(where, str(err))
            return None
        finally:
            catalog.close()

    def _check(self, catalog: Catalog, mount: Mount, where: str
               ) -> tuple[Counters | None, Entry | None]:
        report = self.report
        report.catalogs += 1
        if mount.size is not None and mount.size != catalog.size:
            report.add(where, f"inflated catalog is {catalog.size} bytes, but {mount.size_from} "
                              f"says {mount.size}")
        self._check_properties(catalog, mount, where)
        entries = catalog.entries()
        report.entries += len(entries)
        root = self._check_root(catalog, mount, where)
        computed = _zero()
        transitions: dict[bytes, Entry] = {}
        if root is not None:
            self._rows.walk(catalog, entries, root, mount.path, _label(mount.hash), computed,
                            transitions)
        registered = {ref.path: ref for ref in catalog.references()}
        binds = {ref.path for ref in catalog.references("bind_mountpoints")}
        for path in sorted(set(transitions) - set(registered) - binds):
            report.add(f"{_label(mount.hash)} {display(path)}",
                       "nested catalog mountpoint (flags 2) not registered in nested_catalogs")
        subtree: Counters | None = _zero()
        for path, ref in sorted(registered.items()):
            child_where = f"{_label(mount.hash)} {display(path)} (nested_catalogs)"
            if path not in transitions:
                report.add(child_where, "nested_catalogs row without a transition directory "
                                        "(flags 2) in this catalog")
                continue
            try:
                child_hash = ContentHash.parse(ref.hash)
            except HashError as err:
                report.add(child_where, f"nested_catalogs.sha1: {err}")
                continue
            size = ref.size if isinstance(ref.size, int) else None
            if size is None:
                report.add(child_where, "nested_catalogs.size missing")
            child = self._inspect(Mount(child_hash, path, size, "nested_catalogs.size",
                                        transitions[path]))
            if child is None or subtree is None:
                subtree = None  # unknown below: subtree counters cannot be checked here
            else:
                for name in COUNTERS:
                    subtree[name] += child[name]
        self._check_counters(catalog, computed, subtree, where)
        if subtree is None:
            return None, root
        return {name: computed[name] + subtree[name] for name in COUNTERS}, root

    def _check_properties(self, catalog: Catalog, mount: Mount, where: str) -> None:
        props = catalog.properties
        try:
            schema_ok = abs(float(props.get("schema", "")) - 2.5) < 1e-6
        except ValueError:
            schema_ok = False
        if not schema_ok:
            self.report.add(where, f"property schema is {props.get('schema')!r}, expected 2.5")
        if not props.get("schema_revision", "").isdigit():
            self.report.add(where, "property schema_revision missing or not a number")
        revision = props.get("revision", "")
        if not revision.isdigit():
            self.report.add(where, f"property revision is {revision!r}, not a number")
        if not mount.path:
            if "root_prefix" in props:
                self.report.add(where, f"the root catalog has root_prefix {props['root_prefix']!r}"
                                       " (only nested catalogs have one)")
            ttl = props.get("TTL", "")
            self._roots[mount.hash] = RootInfo(int(revision) if revision.isdigit() else None,
                                               int(ttl) if ttl.isdigit() else None)
        elif catalog.root_prefix != mount.path:
            self.report.add(where, f"property root_prefix is {props.get('root_prefix')!r}, "
                                   f"expected the mountpoint {display(mount.path)!r}")

    def _check_root(self, catalog: Catalog, mount: Mount, where: str) -> Entry | None:
        root = catalog.lookup(mount.path)
        if root is None:
            self.report.add(where, "no row for the catalog's root directory")
            return None
        if not root.is_dir:
            self.report.add(where, f"root entry is not a directory (mode {root.mode:o})")
        if mount.transition is None:
            if root.has(FLAG_NESTED_ROOT):
                self.report.add(where, "root entry of the root catalog flagged as nested root (32)")
            if root.parent != (0, 0):
                self.report.add(where, f"root entry's parent is {root.parent}, expected (0, 0)")
            return root
        if not root.has(FLAG_NESTED_ROOT):
            self.report.add(where, "root entry of a nested catalog not flagged 32")
        if root.parent != md5_pair(parent_path(mount.path)):
            self.report.add(where, "root entry's parent hash is not md5 of the mountpoint's parent")
        for what in differences(mount.transition, root):
            self.report.add(where, f"transition row in the parent and nested root row differ: {what}")
        return root

    def _check_counters(self, catalog: Catalog, computed: Counters, subtree: Counters | None,
                        where: str) -> None:
        """Compare stored counters with the recomputed ones (subtree ones only when known)."""
        stored = catalog.statistics()
        for name in COUNTERS:
            values = [("self", computed[name])]
            if subtree is not None:
                values.append(("subtree", subtree[name]))
            for scope, value in values:
                key = f"{scope}_{name}"
                if key not in stored:
                    self.report.add(where, f"statistics counter {key} missing (expected {value})")
                elif stored[key] != value:
                    self.report.add(where, f"statistics counter {key} is {stored[key]}, "
                                           f"expected {value}")


def _label(catalog: ContentHash) -> str:
    return f"catalog {catalog}{SUFFIX_CATALOG}"
