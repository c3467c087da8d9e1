"""Coverage-guided fuzzing of the tar unpacker (:func:`publisher.tarball.unpack.unpack`) with atheris.

Each input is written to a file and unpacked into a fresh directory ``<root>/l1/l2/dest``,
next to ``<root>/l1/l2/sentinel/secret``. An input is a finding (the fuzzer stops, saves it
under ``--artifacts`` and exits non-zero) when the unpacker:

* raises anything but :class:`publisher.tarball.unpack.UnpackError`;
* changes anything outside ``dest`` under ``<root>`` (new, removed or modified entries, the
  sentinel's content, mode, mtime or link count);
* succeeds and leaves in ``dest`` a set-id bit, or anything but plain files, directories and
  symlinks (after an UnpackError the caller discards ``dest``). Symlinks may point anywhere
  (kept as GNU tar keeps them); that nothing is written *through* one is the first check:
  the sentinel and everything else outside ``dest`` must stay as they were.

The first byte of an input says how the rest is used (:func:`shape`): as it is (compression
detection, decompressors, the tar parser), or as a tar stream whose 512-byte blocks get valid
header checksums, then uncompressed, gzipped or xz-compressed -- so that mutations reach the
header fields instead of dying at the checksum. The seed corpus is every class of
``tests/hostile.py`` (as they are, and their tar streams) plus valid tarballs in every
compression; the instrumented modules are ``publisher.tarball.unpack``, ``publisher.tarball.stream`` and
``publisher.tarball.decompress``.

    python -m tests.fuzz.fuzz_unpack --seconds 60 [--artifacts DIR] [--corpus DIR]
                                     [--max-len 65536] [-- libFuzzer options]

Exit status: 0 when the time ran out without a finding.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import lzma
import os
import shutil
import stat
import sys
import tempfile
import zlib
from pathlib import Path

import atheris

from tests.hostile import HOSTILE_CASES, compress, dir_, hard, reg, sym, tar_bytes

with atheris.instrument_imports(include=["publisher.tarball.unpack", "publisher.tarball.stream",
                                         "publisher.tarball.decompress"]):
    from publisher.tarball import UnpackError, UnpackLimits
    from publisher.tarball.unpack import unpack

LIMITS = UnpackLimits(max_members=300, max_bytes=8 << 20)
SECRET = b"the sentinel must never change\n"


class Sandbox:
    """The directories one input is unpacked in, and the check of what it did."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parent = root / "l1" / "l2"
        self.dest = self.parent / "dest"
        self.source = self.parent / "input"
        self.secret = self.parent / "sentinel" / "secret"
        self.secret.parent.mkdir(parents=True)
        self.secret.write_bytes(SECRET)
        self.secret_stat = _fingerprint(self.secret)
        self.before = self._outside()

    def _outside(self) -> set[str]:
        out: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d != self.dest]
            out.update(str((here / n).relative_to(self.root)) for n in dirnames + filenames
                       if here / n not in (self.dest, self.source))
        return out

    def run(self, data: bytes) -> None:
        self.source.write_bytes(shape(data))
        unpacked = False
        try:
            unpack(self.source, self.dest, LIMITS)
            unpacked = True
        except UnpackError:
            pass  # the caller throws dest away
        finally:
            self.check(unpacked)
            _remove(self.dest)

    def check(self, unpacked: bool) -> None:
        after = self._outside()
        if after != self.before:
            raise AssertionError(f"written outside dest: {sorted(after ^ self.before)[:10]}")
        if self.secret.read_bytes() != SECRET or _fingerprint(self.secret) != self.secret_stat:
            raise AssertionError("the sentinel changed")
        if not unpacked:
            return
        for dirpath, dirnames, filenames in os.walk(self.dest):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    raise AssertionError(f"set-id bit on {path}")
                if not (stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode)
                        or stat.S_ISDIR(st.st_mode)):
                    raise AssertionError(f"special file {path}: {oct(st.st_mode)}")


BLOCK = 512
_ZERO = bytes(BLOCK)


def with_checksums(data: bytes) -> bytes:
    """``data`` with a valid tar header checksum in every non-zero 512-byte block."""
    out = bytearray(data)
    for start in range(0, len(out) - BLOCK + 1, BLOCK):
        block = out[start:start + BLOCK]
        if block == _ZERO:
            continue
        block[148:156] = b" " * 8
        out[start + 148:start + 156] = b"%06o\0 " % sum(block)
    return bytes(out)


def shape(data: bytes) -> bytes:
    """The file an input stands for: byte 0 picks raw, tar, tar.gz or tar.xz (see above)."""
    if not data:
        return data
    mode, body = data[0] % 4, data[1:]
    if mode == 0:
        return body
    body = with_checksums(body)
    if mode == 1:
        return body
    if mode == 2:
        return gzip.compress(body, compresslevel=1, mtime=0)
    return lzma.compress(body, preset=0)


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_mtime_ns, st.st_nlink


def _remove(path: Path) -> None:
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path)


def seeds(directory: Path) -> None:
    """Write the seed corpus: every hostile class, and valid tarballs of every kind."""
    directory.mkdir(parents=True, exist_ok=True)
    made = directory / "made"
    made.mkdir()
    for name, build in HOSTILE_CASES.items():
        data = build(made).read_bytes()
        if len(data) <= 1 << 16:
            (directory / f"hostile-{name}").write_bytes(b"\0" + data)
        with contextlib.suppress(OSError, EOFError, zlib.error):
            tar = gzip.decompress(data)
            if len(tar) <= 1 << 16:
                (directory / f"hostile-tar-{name}").write_bytes(b"\1" + tar)
    shutil.rmtree(made)
    valid = [dir_("top/"), reg("top/a.txt", b"hello\n"), reg("top/bin/run.sh", b"#!/bin/sh\n",
                                                                0o755),
             sym("top/link", "a.txt"), hard("top/hard", "top/a.txt"), reg("top/" + "n" * 120)]
    for compression in ("none", "gzip", "bzip2", "xz", "zstd"):
        (directory / f"valid-{compression}").write_bytes(b"\0" + compress(tar_bytes(valid),
                                                                          compression))
    for mode in (1, 2, 3):
        (directory / f"valid-mode{mode}").write_bytes(bytes([mode]) + tar_bytes(valid))


def main(argv: list[str] | None = None) -> int:
    """Fuzz for ``--seconds``; 0 if nothing was found."""
    args = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in args:
        extra = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--artifacts", default=".", help="where findings are saved")
    parser.add_argument("--corpus", help="a corpus directory to grow (default: a temporary one)")
    parser.add_argument("--max-len", type=int, default=1 << 16)
    opts = parser.parse_args(args)
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="fuzz-unpack-", dir=shm if shm.is_dir() else None))
    try:
        corpus = Path(opts.corpus) if opts.corpus else work / "corpus"
        if not corpus.exists() or not any(corpus.iterdir()):
            seeds(corpus)
        sandbox = Sandbox(work / "sandbox")
        artifacts = Path(opts.artifacts).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        fuzzer_argv = [sys.argv[0], str(corpus), f"-max_total_time={opts.seconds}",
                       f"-max_len={opts.max_len}", "-timeout=20", "-rss_limit_mb=2048",
                       f"-artifact_prefix={artifacts}/", "-print_final_stats=1", *extra]
        sys.stdout.flush()
        pid = os.fork()  # libFuzzer ends its process with exit(): clean up from the parent
        if pid == 0:
            try:
                atheris.Setup(fuzzer_argv, sandbox.run)
                atheris.Fuzz()  # 0 when the time ran out, non-zero on a finding
            finally:
                os._exit(70)
        status = os.waitpid(pid, 0)[1]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
