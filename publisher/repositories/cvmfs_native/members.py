"""Stream a user's tarball into an in-memory tree, storing file contents as objects on the way.

The archive is read once: :mod:`publisher.tarball.decompress` and :class:`publisher.tarball.stream.TarReader`
give the members and their data (``read_data``); each regular file's data goes straight to the
object pipeline (whole if at most the minimum chunk size, else cut into ``P`` chunks), and the
tree records names, modes and mtimes. Nothing is written to disk but objects.

The safety rules are those of :mod:`publisher.tarball.unpack`: names and symlink targets are judged by
its own ``clean_path`` and ``check_symlink``; the structural rules (hard links to a regular
file seen earlier, no type changes involving a directory, nothing below a file or symlink,
symlinks re-resolved through other symlinks at the end, the member and byte limits) are
applied to the tree instead of a directory, with the same messages.
Modes become 0o644/0o755 for files and ``mode | 0o755`` for directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from publisher.repositories.cvmfs_native.chunking import DEFAULT_PARAMS, Chunker, ChunkParams
from publisher.repositories.cvmfs_native.objects import PARTIAL, ObjectPipeline
from publisher.repositories.cvmfs_native.tree import Dir, File, FileData, Node, Symlink
from publisher.tarball.decompress import UnpackError, detect_compression, open_chunks
from publisher.tarball.stream import DIR, LNK, REG, SYM, Member, TarReader, show
from publisher.tarball.unpack import UnpackLimits, UnpackStats, check_symlink, clean_path

_PIECE = 1 << 20  # bytes read from the tar stream at a time for chunked files (512-aligned)
_MAX_HOPS = 40
OFFLOAD_MAX = 128 << 20  # larger files are chunked while they stream, in this process


def _fail(member: bytes, reason: str) -> UnpackError:
    return UnpackError(f"member {show(member)}: {reason}")


@dataclass
class BuildResult:
    """The tree of one CID and what unpacking it would have created."""

    root: Dir
    stats: UnpackStats


class TreeBuilder:
    """Applies members to the tree, enforcing the unpacker's rules."""

    def __init__(self, visible_root: bytes, limits: UnpackLimits, pipeline: ObjectPipeline,
                 now_ns: int, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self.visible_root = visible_root.rstrip(b"/") + b"/"  # for the PATH_MAX check
        self.limits = limits
        self.pipeline = pipeline
        self.params = params
        self.now_ns = now_ns
        self.root = Dir(0o755, now_ns)
        self.nodes: dict[bytes, Node] = {b"": self.root}
        self.dir_meta: dict[bytes, tuple[int, int]] = {}
        self.recheck: list[tuple[bytes, bytes]] = []
        self.entries = self.files = self.symlinks = self.hardlinks = self.nbytes = 0
        self.directories = 0

    # -- names ------------------------------------------------------------------------------
    def clean(self, raw: bytes, member: bytes, what: str = "path") -> bytes:
        """The normalised relative path of ``raw``, or UnpackError (the unpacker's rule)."""
        return clean_path(raw, member, len(self.visible_root), what)

    def _count(self, member: bytes) -> None:
        self.entries += 1
        if self.entries > self.limits.max_members:
            raise _fail(member, f"too many members (more than {self.limits.max_members})")

    def _place(self, rel: bytes, member: bytes, kind: str) -> Dir:
        """Make room for a new ``kind`` entry at ``rel``; return its parent directory."""
        old = self.nodes.get(rel)
        parent_rel = rel.rpartition(b"/")[0]
        if old is not None:
            if isinstance(old, Dir) or kind == DIR:
                raise _fail(member, f"would replace a {_kind(old)} with a {kind}")
            parent = self.nodes[parent_rel]
            assert isinstance(parent, Dir)
            return parent
        self._count(member)
        parent_node = self.nodes.get(parent_rel)
        if isinstance(parent_node, Dir):
            return parent_node
        missing = []
        probe = parent_rel
        while probe:
            found = self.nodes.get(probe)
            if isinstance(found, Dir):
                break
            if found is not None:
                raise _fail(member, f"path goes through a {_kind(found)} {show(probe)}")
            missing.append(probe)
            probe = probe.rpartition(b"/")[0]
        for p in reversed(missing):
            self._count(member)
            self._link(p, Dir(0o755, self.now_ns))
            self.directories += 1
        parent = self.nodes[parent_rel]
        assert isinstance(parent, Dir)
        return parent

    def _link(self, rel: bytes, node: Node) -> None:
        parent = self.nodes[rel.rpartition(b"/")[0]]
        assert isinstance(parent, Dir)
        parent.children[rel.rpartition(b"/")[2]] = node
        self.nodes[rel] = node

    # -- members ----------------------------------------------------------------------------
    def add(self, m: Member, reader: TarReader) -> None:
        """Apply one member (consuming its data)."""
        if m.kind == REG:
            self._file(m, reader)
        elif m.kind == DIR:
            self._directory(m)
        elif m.kind == SYM:
            self._symlink(m)
        elif m.kind == LNK:
            self._hardlink(m)
        else:  # pragma: no cover - TarReader reports only these kinds
            raise _fail(m.name, f"unsupported member kind {m.kind}")

    def _file(self, m: Member, reader: TarReader) -> None:
        raw = m.name
        rel = self.clean(raw, raw)
        if not rel:
            raise _fail(raw, "a file cannot replace the CID directory")
        size = m.size
        if self.nbytes + size > self.limits.max_bytes:
            raise _fail(raw, f"unpacked size exceeds the limit of {self.limits.max_bytes} bytes")
        self.nbytes += size
        self._place(rel, raw, REG)
        data = FileData(size, 0o755 if m.mode & 0o111 else 0o644, m.mtime_ns)
        self._store(data, reader)
        self._link(rel, File(data))
        self.files += 1

    def _store(self, data: FileData, reader: TarReader) -> None:
        size = data.size
        if size <= self.params.minimum:
            data.whole = self.pipeline.submit(reader.read_data(size) if size else b"")
            return
        if size <= OFFLOAD_MAX:  # chunked by a worker, whole
            data.job = self.pipeline.submit_file(reader.read_data(size), self.params)
            return
        chunker = Chunker(self.params)
        left = size
        while left:
            piece = min(left, _PIECE)
            for chunk in chunker.feed(reader.read_data(piece)):
                data.chunks.append((len(chunk), self.pipeline.submit(chunk, PARTIAL)))
            left -= piece
        rest = chunker.finish()
        if not data.chunks:
            data.whole = self.pipeline.submit(rest)
        elif rest:
            data.chunks.append((len(rest), self.pipeline.submit(rest, PARTIAL)))

    def _directory(self, m: Member) -> None:
        rel = self.clean(m.name, m.name)
        if not isinstance(self.nodes.get(rel), Dir):
            self._place(rel, m.name, DIR)
            self._link(rel, Dir(0o755, self.now_ns))
            self.directories += 1
        self.dir_meta[rel] = (m.mode, m.mtime_ns)

    def _symlink(self, m: Member) -> None:
        raw, target = m.name, m.linkname
        rel = self.clean(raw, raw)
        if not rel:
            raise _fail(raw, "a symlink cannot replace the CID directory")
        recheck = check_symlink(rel, raw, target)
        self._place(rel, raw, SYM)
        self._link(rel, Symlink(target, m.mtime_ns))
        self.symlinks += 1
        if recheck:
            self.recheck.append((rel, raw))

    def _hardlink(self, m: Member) -> None:
        raw = m.name
        rel = self.clean(raw, raw)
        if not m.linkname:
            raise _fail(raw, "hard link target is empty")
        target = self.clean(m.linkname, raw, "hard link target")
        node = self.nodes.get(target)
        if not isinstance(node, File):
            raise _fail(
                raw, f"hard link target {show(m.linkname)} is not a file extracted earlier"
            )
        if target == rel:
            raise _fail(raw, "hard link to itself")
        self._place(rel, raw, LNK)
        self._link(rel, File(node.data))
        self.hardlinks += 1

    # -- the end ------------------------------------------------------------------------------
    def finish(self, compression: str) -> BuildResult:
        """Re-check symlinks through other symlinks, apply directory modes and mtimes."""
        for rel, raw in self.recheck:
            if isinstance(self.nodes.get(rel), Symlink) and not self._inside(rel):
                raise _fail(raw, "symlink resolves outside the CID directory")
        for rel, (mode, mtime) in self.dir_meta.items():
            node = self.nodes.get(rel)
            if isinstance(node, Dir):
                node.mode = (mode & 0o777) | 0o755
                node.mtime_ns = mtime
        self.root.mtime_ns = self.now_ns  # a CID directory's mtime is its publication time
        stats = UnpackStats(compression=compression, files=self.files,
                            directories=self.directories, symlinks=self.symlinks,
                            hardlinks=self.hardlinks, bytes=self.nbytes)
        return BuildResult(self.root, stats)

    def _inside(self, rel: bytes) -> bool:
        """Resolve ``rel`` like realpath(3) within the tree; False if it leaves the root."""
        todo = rel.split(b"/")
        done: list[bytes] = []
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp in (b"", b"."):
                continue
            if comp == b"..":
                if not done:
                    return False
                done.pop()
                continue
            done.append(comp)
            node = self.nodes.get(b"/".join(done))
            if isinstance(node, Symlink):
                hops += 1
                if hops > _MAX_HOPS:
                    return True  # a loop stays where it is
                done.pop()
                todo = node.target.split(b"/") + todo
        return True


def _kind(node: Node) -> str:
    return DIR if isinstance(node, Dir) else SYM if isinstance(node, Symlink) else REG


def build_tree(payload: os.PathLike[str] | str, visible_root: bytes, limits: UnpackLimits,
               pipeline: ObjectPipeline, now_ns: int,
               params: ChunkParams = DEFAULT_PARAMS) -> BuildResult:
    """Read the tarball ``payload`` into a tree; file contents go to ``pipeline``."""
    builder = TreeBuilder(visible_root, limits, pipeline, now_ns, params)
    with open(payload, "rb") as f:
        compression = detect_compression(os.pread(f.fileno(), 4096, 0))
        with open_chunks(f, compression) as chunks:
            reader = TarReader(chunks, 3 * limits.max_members + 16, limits.max_bytes)
            for member in reader:
                builder.add(member, reader)
    return builder.finish(compression)
