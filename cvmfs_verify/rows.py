"""Row-level rules of one catalog (spec §6, §8, §10, after ``swissknife check``'s ``Find``).

From the catalog's root row down: path hashes, names, type-specific rules (directories, symlinks,
regular and special files, flags against modes), chunk lists, directory link counts, hardlink
groups, extended attributes, nested catalog markers and mountpoints, and no dangling rows. Rows
are counted into the statistics counters; content objects are handed to ``add_object``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from cvmfs_verify.catalog import (
    FLAG_BIND_MOUNTPOINT,
    FLAG_CHUNKED,
    FLAG_DIR,
    FLAG_DIRECT_IO,
    FLAG_EXTERNAL,
    FLAG_FILE,
    FLAG_LINK,
    FLAG_NESTED_MOUNTPOINT,
    FLAG_SPECIAL,
    Catalog,
    Entry,
    display,
)
from cvmfs_verify.hashes import (
    SUFFIX_NONE,
    SUFFIX_PARTIAL,
    ContentHash,
    HashError,
    algorithm_from_flags,
    compression_from_flags,
    md5_pair,
)
from cvmfs_verify.report import ObjectRef, Report

Counters = dict[str, int]
MARKER = b".cvmfscatalog"


class RowChecker:
    """Checks the rows of catalogs, adding problems to a report."""

    def __init__(self, report: Report, add_object: Callable[[ObjectRef], None]) -> None:
        self.report = report
        self._add_object = add_object

    def walk(self, catalog: Catalog, entries: list[Entry], root: Entry, top: bytes, label: str,
             counters: Counters, transitions: dict[bytes, Entry]) -> None:
        """Check every row below ``root`` (the catalog's root row at ``top``), counting them."""
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
                for what in differences(first, other, names=False):
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


def differences(a: Entry, b: Entry, *, names: bool = True) -> list[str]:
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
