"""Stream a user's tarball into an in-memory tree, storing file contents as objects on the way.

The archive is read once: :mod:`publisher.tarball.decompress` and
:class:`publisher.tarball.stream.TarReader` give the members and their data (``read_data``);
each regular file's data goes straight to the object pipeline (whole if at most the minimum
chunk size, else cut into ``P`` chunks), and the tree records names, modes and mtimes. Nothing
is written to disk but objects. What a member may be and where it may go is decided by
:class:`publisher.tarball.rules.MemberRules`, the rules every backend shares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from publisher.repositories.cvmfs_native.chunking import DEFAULT_PARAMS, Chunker, ChunkParams
from publisher.repositories.cvmfs_native.objects import PARTIAL, ObjectPipeline
from publisher.repositories.cvmfs_native.tree import Dir, File, FileData, Node, Symlink
from publisher.tarball.decompress import detect_compression, open_chunks
from publisher.tarball.rules import MemberRules, Placement, UnpackLimits, UnpackStats, file_mode
from publisher.tarball.stream import DIR, LNK, REG, SYM, Member, TarReader

_PIECE = 1 << 20  # bytes read from the tar stream at a time for chunked files (512-aligned)
OFFLOAD_MAX = 128 << 20  # larger files are chunked while they stream, in this process


@dataclass
class BuildResult:
    """The tree of one CID and what unpacking it would have created."""

    root: Dir
    stats: UnpackStats


class TreeBuilder:
    """Builds the tree the member rules decide, storing file data as objects."""

    def __init__(self, visible_root: bytes, limits: UnpackLimits, pipeline: ObjectPipeline,
                 now_ns: int, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self.rules = MemberRules(len(visible_root.rstrip(b"/") + b"/"), limits)
        self.pipeline = pipeline
        self.params = params
        self.now_ns = now_ns
        self.root = Dir(0o755, now_ns)
        self.nodes: dict[bytes, Node] = {b"": self.root}

    def _prepare(self, placed: Placement) -> None:
        """Create the parents a member implies (an entry it replaces is overwritten)."""
        for parent in placed.parents:
            self._link(parent, Dir(0o755, self.now_ns))

    def _link(self, rel: bytes, node: Node) -> None:
        parent = self.nodes[rel.rpartition(b"/")[0]]
        assert isinstance(parent, Dir)
        parent.children[rel.rpartition(b"/")[2]] = node
        self.nodes[rel] = node

    # -- members ----------------------------------------------------------------------------
    def add(self, m: Member, reader: TarReader) -> None:
        """Apply one member (consuming its data)."""
        if m.kind == REG:
            placed = self.rules.file(m)
            if placed is None:
                return  # a reserved name: its data is skipped by the reader
            self._prepare(placed)
            data = FileData(m.size, file_mode(m.mode), m.mtime_ns)
            self._store(data, reader)
            self._link(placed.rel, File(data))
        elif m.kind == DIR:
            dir_placed = self.rules.directory(m)
            if dir_placed is not None:
                self._prepare(dir_placed)
                self._link(dir_placed.rel, Dir(0o755, self.now_ns))
        elif m.kind == SYM:
            link = self.rules.symlink(m)
            if link is not None:
                self._prepare(link)
                self._link(link.rel, Symlink(link.target, m.mtime_ns))
        elif m.kind == LNK:
            hard = self.rules.hardlink(m)
            if hard is None:
                return
            self._prepare(hard)
            node = self.nodes[hard.target]
            assert isinstance(node, File)
            self._link(hard.rel, File(node.data))
            return
        else:  # pragma: no cover - TarReader reports only these kinds
            raise ValueError(f"unsupported member kind {m.kind}")

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

    # -- the end ------------------------------------------------------------------------------
    def finish(self, compression: str) -> BuildResult:
        """Apply directory modes and mtimes."""
        for rel, mode, mtime in self.rules.directory_modes():
            node = self.nodes[rel]
            assert isinstance(node, Dir)
            node.mode = mode
            node.mtime_ns = mtime if mtime is not None else node.mtime_ns
        self.root.mtime_ns = self.now_ns  # a CID directory's mtime is its publication time
        return BuildResult(self.root, self.rules.stats(compression))


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
