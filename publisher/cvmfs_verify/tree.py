"""Walking every catalog reachable from the root and checking each one (spec §6, §7, §8, §10).

Per catalog: the object (hash, inflate, size), schema and properties, the root entry (and its
equality with the parent's transition row), every row reachable from the root (path hash, name,
type-specific rules, directory link counts, hardlink groups, chunk lists), no dangling rows, the
nested catalog registrations and markers, and all 24 statistics counters (self and subtree).
Content objects are only collected here; :mod:`verify` re-hashes them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from publisher.cvmfs_verify.catalog import (
    COUNTERS,
    FLAG_BIND_MOUNTPOINT,
    FLAG_CHUNKED,
    FLAG_DIR,
    FLAG_DIRECT_IO,
    FLAG_EXTERNAL,
    FLAG_FILE,
    FLAG_LINK,
    FLAG_NESTED_MOUNTPOINT,
    FLAG_NESTED_ROOT,
    FLAG_SPECIAL,
    Catalog,
    DatabaseError,
    Entry,
    display,
)
from publisher.cvmfs_verify.fetch import BadObjectError, FetchError, NotFoundError
from publisher.cvmfs_verify.hashes import (
    SUFFIX_CATALOG,
    SUFFIX_NONE,
    SUFFIX_PARTIAL,
    ContentHash,
    HashError,
    algorithm_from_flags,
    compression_from_flags,
    md5_pair,
    parent_path,
)
from publisher.cvmfs_verify.report import ObjectRef, Report

Counters = dict[str, int]
#: Fetch and open a catalog object; raises NotFoundError/BadObjectError/FetchError/DatabaseError.
CatalogLoader = Callable[[ContentHash], Catalog]
MARKER = b".cvmfscatalog"


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
                for what in _differences(mount.transition, done.root):
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
            self._walk_rows(catalog, entries, root, mount, computed, transitions)
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
        for what in _differences(mount.transition, root):
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

    # -- rows --------------------------------------------------------------------------------

    def _walk_rows(self, catalog: Catalog, entries: list[Entry], root: Entry, mount: Mount,
                   counters: Counters, transitions: dict[bytes, Entry]) -> None:
        top, label = mount.path, _label(mount.hash)
        where = f"{label} {display(top)}"
        children: dict[tuple[int, int], list[Entry]] = defaultdict(list)
        for entry in entries:
            children[entry.parent].append(entry)
        visited = {root.md5}
        chunk_owners = catalog.chunk_owners()
        stack: list[tuple[bytes, Entry]] = [(top, root)]
        while stack:
            path, directory = stack.pop()
            subdirs = 0
            groups: dict[int, list[tuple[bytes, Entry]]] = defaultdict(list)
            marker = False
            for entry in sorted(children.get(md5_pair(path), []), key=lambda e: e.name):
                if entry.md5 in visited:
                    continue
                visited.add(entry.md5)
                full = path + b"/" + entry.name
                at = f"{label} {display(full)}"
                if entry.md5 != md5_pair(full):
                    self.report.add(at, "md5path does not match the MD5 of the path "
                                        "(clients cannot look it up)")
                if not entry.name or b"/" in entry.name:
                    self.report.add(at, f"invalid name {entry.name!r}")
                if entry.name == MARKER:
                    marker = True
                    if path != top:
                        self.report.add(at, "abandoned nested catalog marker")
                if entry.linkcount == 0:
                    self.report.add(at, "linkcount 0")
                if entry.has_xattrs:
                    counters["xattr"] += 1
                    if problem := xattr_problem(entry.xattr or b""):
                        self.report.add(at, problem)
                if entry.is_dir:
                    subdirs += 1
                    counters["dir"] += 1
                    if self._check_dir(entry, full, at, counters, transitions, children):
                        stack.append((full, entry))
                else:
                    self._check_file(catalog, entry, at, counters)
                    if entry.linkcount > 1:
                        if entry.hardlink_group == 0:
                            self.report.add(at, f"linkcount {entry.linkcount} without a "
                                                "hardlink group")
                        else:
                            groups[entry.hardlink_group].append((full, entry))
                    if entry.md5 in chunk_owners and not entry.has(FLAG_CHUNKED):
                        self.report.add(at, "chunks rows for a file not flagged chunked (64)")
            dir_at = f"{label} {display(path)}"
            if directory.linkcount != subdirs + 2:
                self.report.add(dir_at, f"directory linkcount is {directory.linkcount}, expected "
                                        f"{subdirs + 2} (2 + {subdirs} subdirectories)")
            if path == top and top and not marker:
                self.report.add(dir_at, "nested catalog without marker (.cvmfscatalog)")
            self._check_groups(groups, dir_at)
        if root.has_xattrs:
            counters["xattr"] += 1
            if problem := xattr_problem(root.xattr or b""):
                self.report.add(where, problem)
        counters["dir"] += 1  # the catalog's own root directory
        dangling = [e for e in entries if e.md5 not in visited]
        if dangling:
            names = ", ".join(repr(e.name.decode("utf-8", "replace")) for e in dangling[:5])
            self.report.add(where, f"{len(dangling)} dangling rows not reachable from the root "
                                   f"directory ({names}{', ...' if len(dangling) > 5 else ''})")

    def _check_dir(self, entry: Entry, full: bytes, at: str, counters: Counters,
                   transitions: dict[bytes, Entry],
                   children: dict[tuple[int, int], list[Entry]]) -> bool:
        """Directory rules; True when the walk descends into it in this catalog."""
        if not entry.has(FLAG_DIR):
            self.report.add(at, f"directory (mode {entry.mode:o}) without flag 1 (flags {entry.flags})")
        if entry.hash is not None:
            self.report.add(at, "directory with a content hash")
        if entry.hardlink_group:
            self.report.add(at, "directory in a hardlink group")
        if entry.has(FLAG_DIRECT_IO):
            self.report.add(at, "direct I/O flag on a directory")
        if entry.flags & (FLAG_FILE | FLAG_LINK | FLAG_SPECIAL):
            self.report.add(at, f"directory with file, link or special flags (flags {entry.flags})")
        nested, bind = entry.has(FLAG_NESTED_MOUNTPOINT), entry.has(FLAG_BIND_MOUNTPOINT)
        if not (nested or bind):
            return True
        if nested and bind:
            self.report.add(at, "both nested and bind mountpoint")
        if nested:
            counters["nested"] += 1
            transitions[full] = entry
        if children.get(md5_pair(full)):
            self.report.add(at, "nested catalog mountpoint has rows below it in the parent catalog")
        return False

    def _check_file(self, catalog: Catalog, entry: Entry, at: str, counters: Counters) -> None:
        """Rules for symlinks, regular files (with chunks) and special files."""
        if entry.has(FLAG_DIR):
            self.report.add(at, f"non-directory (mode {entry.mode:o}) with flag 1")
        if entry.is_link:
            counters["symlink"] += 1
            if not entry.has(FLAG_LINK):
                self.report.add(at, f"symlink without flag 8 (flags {entry.flags})")
            if entry.hash is not None:
                self.report.add(at, "symlink with a content hash")
            if entry.symlink is None:
                self.report.add(at, "symlink target is NULL (must be text)")
            elif entry.size != len(entry.symlink):
                self.report.add(at, f"symlink size is {entry.size}, target is "
                                    f"{len(entry.symlink)} bytes")
        elif entry.is_regular:
            counters["regular"] += 1
            counters["file_size"] += entry.size
            if not entry.has(FLAG_FILE) or entry.has(FLAG_LINK):
                self.report.add(at, f"regular file with flags {entry.flags} (needs 4, not 8)")
            self._check_content(catalog, entry, at, counters)
        else:
            counters["special"] += 1
            if not entry.has(FLAG_SPECIAL):
                self.report.add(at, f"special file without flag 16 (flags {entry.flags})")
            if entry.hash is not None:
                self.report.add(at, "special file with a content hash")
            if entry.symlink:
                self.report.add(at, "special file with a symlink target")
        if not entry.is_regular and entry.has(FLAG_DIRECT_IO):
            self.report.add(at, "direct I/O flag on a non-regular file")
        if entry.has(FLAG_EXTERNAL):
            counters["external"] += 1
            counters["external_file_size"] += entry.size
            if not entry.is_regular:
                self.report.add(at, "only regular files can be external")

    def _check_content(self, catalog: Catalog, entry: Entry, at: str, counters: Counters) -> None:
        try:
            compressed = compression_from_flags(entry.flags) == "zlib"
            content = entry.content_hash()
            algorithm = algorithm_from_flags(entry.flags)
        except HashError as err:
            self.report.add(at, str(err))
            return
        external = entry.has(FLAG_EXTERNAL)
        if entry.has(FLAG_CHUNKED):
            chunks = catalog.chunks(entry.md5)
            counters["chunked"] += 1
            counters["chunked_size"] += entry.size
            counters["chunks"] += len(chunks)
            if not chunks:
                self.report.add(at, "chunked file (flags 64) without chunks rows")
            offset = 0
            for index, chunk in enumerate(chunks):
                if chunk.offset != offset:
                    self.report.add(at, f"chunk {index} at offset {chunk.offset}, expected {offset}"
                                        " (misaligned chunk offsets)")
                offset = chunk.offset + chunk.size
                if len(chunk.hash) != 20:
                    self.report.add(at, f"chunk {index}: hash of {len(chunk.hash)} bytes")
                elif not external:
                    ref = ContentHash(chunk.hash.hex(), algorithm)
                    self._add_object(ObjectRef(ref, SUFFIX_PARTIAL, compressed, chunk.size,
                                               f"{at} (chunk {index} at {chunk.offset})"))
            if chunks and sum(c.size for c in chunks) != entry.size:
                self.report.add(at, f"chunks cover {sum(c.size for c in chunks)} bytes, "
                                    f"the file has {entry.size}")
        elif content is None:
            self.report.add(at, "regular file with a NULL hash (and not chunked)")
        if content is not None and not external:
            self._add_object(ObjectRef(content, SUFFIX_NONE, compressed, entry.size, at))

    def _check_groups(self, groups: dict[int, list[tuple[bytes, Entry]]], dir_at: str) -> None:
        for group, members in sorted(groups.items()):
            first_path, first = members[0]
            for path, other in members[1:]:
                for what in _differences(first, other, names=False):
                    self.report.add(f"{dir_at} (hardlink group {group})",
                                    f"{display(path)} differs from {display(first_path)}: {what}")
            if first.linkcount != len(members):
                self.report.add(f"{dir_at} (hardlink group {group})",
                                f"linkcount is {first.linkcount}, but {len(members)} entries "
                                f"share the group")


def xattr_problem(blob: bytes) -> str | None:
    """Spec §6: ``uint8 version (1), uint8 count``, then per attribute ``uint8 len_key,
    uint8 len_value, key, value``; None when ``blob`` has that shape."""
    if len(blob) < 2 or blob[0] != 1:
        return "xattr blob without the version-1 header"
    offset = 2
    for index in range(blob[1]):
        if offset + 2 > len(blob):
            return f"xattr blob truncated in attribute {index}"
        offset += 2 + blob[offset] + blob[offset + 1]
    if offset != len(blob):
        return f"xattr blob is {len(blob)} bytes, its {blob[1]} attributes need {offset}"
    return None


def _label(catalog: ContentHash) -> str:
    return f"catalog {catalog}{SUFFIX_CATALOG}"


def _differences(a: Entry, b: Entry, *, names: bool = True) -> list[str]:
    """What differs between two rows that must describe the same inode (flags excluded)."""
    fields = [("linkcount", a.linkcount, b.linkcount), ("hardlink group", a.hardlink_group,
              b.hardlink_group), ("size", a.size, b.size), ("mode", a.mode, b.mode),
              ("mtime", a.mtime, b.mtime), ("hash", a.hash, b.hash),
              ("symlink", a.symlink or b"", b.symlink or b""),
              ("external flag", a.has(FLAG_EXTERNAL), b.has(FLAG_EXTERNAL)),
              ("xattrs", a.has_xattrs, b.has_xattrs)]
    if names:
        fields.insert(0, ("name", a.name, b.name))
    return [f"{name} {x!r} / {y!r}" for name, x, y in fields if x != y]
