"""An unpacked CID held in memory, and its conversion into catalogs (one per marked directory).

The tree mirrors what :func:`publisher.tarball.unpack.unpack` would create on disk, but regular files
hold the hashes of their stored objects instead of data. Hard links share one
:class:`FileData`. :func:`write_catalogs` turns a subtree into a nested catalog (and further
nested catalogs below directories holding a ``.cvmfscatalog`` marker), bottom-up, and stores
them in the object store.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from publisher.repositories.cvmfs_native.catalog import (
    CHUNKED,
    DIR,
    DIR_SIZE,
    FILE,
    LINK,
    NESTED_MOUNTPOINT,
    NESTED_ROOT,
    CatalogFile,
    Counters,
    Row,
)
from publisher.repositories.cvmfs_native.objects import (
    CATALOG,
    FileTicket,
    ObjectStore,
    StoredObject,
    Ticket,
)

MARKER = b".cvmfscatalog"
Pending = Ticket | StoredObject


def _result(item: Pending) -> StoredObject:
    return item.result() if isinstance(item, Ticket) else item


@dataclass(slots=True, eq=False)
class FileData:
    """The content of a regular file (shared by its hard links)."""

    size: int
    mode: int  # permission bits
    mtime_ns: int
    whole: Pending | None = None  # a non-chunked file's object
    chunks: list[tuple[int, Pending]] = field(default_factory=list)  # (size, object) of P chunks
    job: FileTicket | None = None  # a file stored (and chunked) by a worker

    def resolve(self) -> None:
        """Wait for the stored objects (raises what storing raised)."""
        if self.job is not None:
            pieces = self.job.result()
            self.job = None
            if len(pieces) == 1:
                self.whole = pieces[0][1]
            else:
                self.chunks = [(size, obj) for size, obj in pieces]
        if self.whole is not None:
            self.whole = _result(self.whole)
        self.chunks = [(size, _result(obj)) for size, obj in self.chunks]


@dataclass(slots=True, eq=False)
class Dir:
    """A directory; ``children`` maps names to nodes."""

    mode: int = 0o755
    mtime_ns: int = 0
    children: dict[bytes, Node] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class File:
    """One name of a regular file."""

    data: FileData


@dataclass(slots=True, eq=False)
class Symlink:
    """A symbolic link."""

    target: bytes
    mtime_ns: int


Node = Dir | File | Symlink


@dataclass(frozen=True)
class BuiltCatalog:
    """A stored catalog: its object, inflated size, counters (self + subtree) and root row."""

    digest: str
    size: int
    totals: Counters
    root: Row
    written: tuple[str, ...]  # hex hashes of this catalog and every catalog below it


@dataclass
class CatalogContext:
    """What writing catalogs needs besides the tree."""

    store: ObjectStore
    revision: int
    now: int
    uid: int
    gid: int
    temp: Callable[[], Path]


def iter_files(node: Dir) -> list[FileData]:
    """Every distinct FileData below ``node``."""
    seen: dict[int, FileData] = {}
    stack = [node]
    while stack:
        d = stack.pop()
        for child in d.children.values():
            if isinstance(child, Dir):
                stack.append(child)
            elif isinstance(child, File):
                seen[id(child.data)] = child.data
    return list(seen.values())


def is_mountpoint(node: Dir) -> bool:
    """True when the directory holds a ``.cvmfscatalog`` marker file."""
    return isinstance(node.children.get(MARKER), File)


def write_catalogs(node: Dir, path: bytes, ctx: CatalogContext) -> BuiltCatalog:
    """Write ``node`` (mounted at ``path``) and what is below as nested catalog(s)."""
    catalog_path = ctx.temp()
    cat = CatalogFile.create(catalog_path, root_prefix=path)
    try:
        root_row = _dir_row(node, path, ctx, DIR | NESTED_ROOT)
        cat.add([root_row])
        subtree = Counters()
        written: list[str] = []
        groups = _GroupIds()
        stack: list[tuple[Dir, bytes]] = [(node, path)]
        while stack:
            d, dpath = stack.pop()
            rows: list[Row] = []
            links = Counter(id(c.data) for c in d.children.values() if isinstance(c, File))
            dir_groups: dict[int, int] = {}
            for name, child in d.children.items():
                cpath = dpath + b"/" + name
                if isinstance(child, Dir):
                    if is_mountpoint(child):
                        sub = write_catalogs(child, cpath, ctx)
                        rows.append(sub.root.with_flags(DIR | NESTED_MOUNTPOINT))
                        cat.set_nested(cpath, sub.digest, sub.size)
                        subtree = subtree + sub.totals
                        written.extend(sub.written)
                    else:
                        rows.append(_dir_row(child, cpath, ctx, DIR))
                        stack.append((child, cpath))
                elif isinstance(child, Symlink):
                    rows.append(Row(cpath, stat.S_IFLNK | 0o777, FILE | LINK,
                                    size=len(child.target), mtime_ns=child.mtime_ns,
                                    symlink=child.target, uid=ctx.uid, gid=ctx.gid))
                else:
                    data = child.data
                    count = links[id(data)]
                    group = 0
                    if count > 1:
                        group = dir_groups.setdefault(id(data), groups.next())
                    rows.append(_file_row(cat, data, cpath, count, group, ctx))
            cat.add(rows)
        totals = cat.finish(revision=ctx.revision, now=ctx.now, subtree=subtree)
        stored = ctx.store.put_file(catalog_path, CATALOG)
        size = catalog_path.stat().st_size
    finally:
        catalog_path.unlink(missing_ok=True)
    return BuiltCatalog(stored.hex, size, totals, root_row, (stored.hex, *written))


class _GroupIds:
    """Hard-link group numbers, unique within one catalog (starting at 1)."""

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        self.last += 1
        return self.last


def _dir_row(node: Dir, path: bytes, ctx: CatalogContext, flags: int) -> Row:
    subdirs = sum(1 for c in node.children.values() if isinstance(c, Dir))
    return Row(path, stat.S_IFDIR | node.mode, flags, size=DIR_SIZE, mtime_ns=node.mtime_ns,
               linkcount=2 + subdirs, uid=ctx.uid, gid=ctx.gid)


def _file_row(cat: CatalogFile, data: FileData, path: bytes, count: int, group: int,
              ctx: CatalogContext) -> Row:
    mode = stat.S_IFREG | data.mode
    if data.chunks:
        offset = 0
        chunks = []
        for size, obj in data.chunks:
            chunks.append((offset, size, _result(obj).digest))
            offset += size
        cat.add_chunks(path, chunks)
        return Row(path, mode, FILE | CHUNKED, size=data.size, mtime_ns=data.mtime_ns,
                   linkcount=count, group=group, uid=ctx.uid, gid=ctx.gid)
    assert data.whole is not None
    return Row(path, mode, FILE, size=data.size, mtime_ns=data.mtime_ns,
               digest=_result(data.whole).digest, linkcount=count, group=group,
               uid=ctx.uid, gid=ctx.gid)
