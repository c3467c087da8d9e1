"""Deterministic benchmark corpus for the unpacker (the "mixed-1g" corpus of limits.md).

At scale 1.0: ~30,000 small text-like source files (log-normal sizes, median 4 KiB) plus 20 large
binary-like files (64 KiB chunks: 30% random, 45% machine-code-like, 15% text, 10% zeros), about
1 GB unpacked and ~500 MB as .tar.gz. Everything is derived from SEED, so the same scale always
gives the same bytes. Results are cached below the caller's directory and reused.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
import string
import subprocess
from pathlib import Path

SEED = 20240601
MTIME = 1_700_000_000
CHUNK = 64 * 1024
_KEYWORDS = [
    "def",
    "class",
    "return",
    "if",
    "else",
    "elif",
    "for",
    "while",
    "import",
    "from",
    "as",
    "with",
    "try",
    "except",
    "finally",
    "raise",
    "pass",
    "break",
    "continue",
    "lambda",
    "yield",
    "None",
    "True",
    "False",
    "self",
    "int",
    "char",
    "void",
    "static",
    "const",
    "struct",
    "typedef",
    "include",
    "define",
    "unsigned",
    "long",
    "double",
    "float",
    "auto",
    "switch",
    "case",
    "default",
]
_SEPS = (" ", ", ", "(", ")", " = ", ".", ": ", ";", " + ", "[", "]", " -> ")
_EXTS = (".py", ".c", ".h", ".cc", ".txt", ".cfg", ".json", ".sh")


def _zipf_cum(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))


class _Text:
    """Source-like text: Zipf-sampled lines from a line bank plus 15% fresh lines."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        letters = string.ascii_letters + "_"
        idents = ["".join(rng.choices(letters, k=rng.randint(3, 14))) for _ in range(8000)]
        self.vocab = _KEYWORDS + idents
        self.vcum = _zipf_cum(len(self.vocab), 1.1)
        self.lines = [self._fresh() for _ in range(20000)]
        self.lcum = _zipf_cum(len(self.lines), 1.0)

    def _fresh(self) -> str:
        rng = self.rng
        toks = rng.choices(self.vocab, cum_weights=self.vcum, k=rng.randint(3, 11))
        seps = rng.choices(_SEPS, k=len(toks))
        return "".join(t + s for t, s in zip(toks, seps, strict=True))

    def make(self, size: int) -> bytes:
        rng = self.rng
        out: list[str] = []
        total = 0
        while total < size:
            picks = rng.choices(self.lines, cum_weights=self.lcum, k=size // 40 + 1)
            for line in picks:
                text = self._fresh() if rng.random() < 0.15 else line
                text = "    " * rng.randint(0, 3) + text + "\n"
                out.append(text)
                total += len(text)
        return "".join(out).encode()[:size]


def _binary_writer(rng: random.Random, text: _Text) -> list[bytes]:
    """A pool of machine-code-like 64 KiB chunks (Zipf over 4096 short opcodes)."""
    opcodes = [rng.randbytes(rng.randint(2, 8)) for _ in range(4096)]
    cum = _zipf_cum(len(opcodes), 1.1)
    pool = []
    for _ in range(256):
        parts = rng.choices(opcodes, cum_weights=cum, k=CHUNK // 4)
        pool.append(b"".join(parts)[:CHUNK].ljust(CHUNK, b"\x90"))
    return pool


def _write_large(path: Path, size: int, rng: random.Random, text: _Text, pool: list[bytes]) -> None:
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            kind = rng.random()
            if kind < 0.30:
                chunk = rng.randbytes(CHUNK)
            elif kind < 0.75:
                c = pool[rng.randrange(len(pool))]
                off = rng.randrange(CHUNK)
                chunk = c[off:] + c[:off]
            elif kind < 0.90:
                chunk = text.make(CHUNK)
            else:
                chunk = zeros
            f.write(chunk[:left])
            left -= len(chunk)


def _build(tree: Path, scale: float) -> None:
    rng = random.Random(SEED)
    text = _Text(rng)
    n_small = max(1, round(30000 * scale))
    n_large = 20
    total = int(1e9 * scale)
    n_leaf = max(1, round(1800 * scale))
    leaves = sorted(
        {
            f"src/pkg{rng.randrange(12):02d}/m{rng.randrange(40):02d}"
            + "".join(f"/sub{rng.randrange(6)}" for _ in range(rng.randint(0, 3)))
            for _ in range(n_leaf)
        }
    )
    leaf_cum = _zipf_cum(len(leaves), 0.5)
    rng.shuffle(leaves)
    small_bytes = 0
    dirs: set[Path] = set()
    for i in range(n_small):
        size = int(min(262144, max(64, rng.lognormvariate(math.log(4096), 0.67))))
        leaf = rng.choices(leaves, cum_weights=leaf_cum)[0]
        ext = rng.choice(_EXTS)
        d = tree / leaf
        if d not in dirs:
            d.mkdir(parents=True, exist_ok=True)
            dirs.add(d)
        p = d / f"f{i:06d}{ext}"
        p.write_bytes(text.make(size))
        if ext == ".sh":
            p.chmod(0o755)
        os.utime(p, (MTIME, MTIME))
        small_bytes += size
    pool = _binary_writer(rng, text)
    weights = [rng.lognormvariate(0, 0.8) for _ in range(n_large)]
    budget = max(n_large * CHUNK, total - small_bytes)
    for i, w in enumerate(weights):
        sub = "bin" if i % 4 == 0 else "lib"
        (tree / sub).mkdir(exist_ok=True)
        p = tree / sub / f"large{i:02d}.bin"
        _write_large(p, int(budget * w / sum(weights)), rng, text, pool)
        p.chmod(0o755 if sub == "bin" else 0o644)
        os.utime(p, (MTIME, MTIME))
    for dirpath, _dirnames, _files in os.walk(tree, topdown=False):
        os.utime(dirpath, (MTIME, MTIME))


def make_corpus(cache_dir: Path, scale: float = 1.0) -> Path:
    """Return the corpus tree ``cache_dir/corpus-<scale>/mixed``, building it on first use."""
    root = Path(cache_dir) / f"corpus-{scale:g}"
    tree = root / "mixed"
    if (root / "complete").exists():
        return tree
    if root.exists():
        shutil.rmtree(root)
    tree.mkdir(parents=True)
    _build(tree, scale)
    (root / "complete").write_text("ok\n")
    return tree


def _first_tool(*names: str) -> str | None:
    return next((n for n in names if shutil.which(n)), None)


def _compress(tar: Path, out: Path, argv: list[str]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with open(tar, "rb") as src, open(tmp, "wb") as dst:
        subprocess.run(argv, stdin=src, stdout=dst, check=True)
    tmp.rename(out)


def make_tarballs(corpus: Path, outdir: Path) -> dict[str, Path]:
    """Write ``<name>.tar``, ``.tar.gz`` (gzip -6, -n) and ``.tar.bz2`` of *corpus*; cached.

    Returns ``{"none": tar, "gzip": tar.gz, "bzip2": tar.bz2}``.
    """
    corpus = Path(corpus)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"{corpus.parent.name}-{corpus.name}"
    tar = outdir / f"{stem}.tar"
    if not tar.exists():
        tmp = tar.with_name(tar.name + ".tmp")
        subprocess.run(
            [
                "tar",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-cf",
                str(tmp),
                "-C",
                str(corpus.parent),
                corpus.name,
            ],
            check=True,
        )
        tmp.rename(tar)
    out = {"none": tar, "gzip": outdir / f"{stem}.tar.gz", "bzip2": outdir / f"{stem}.tar.bz2"}
    if not out["gzip"].exists():
        gz = _first_tool("pigz") or "gzip"
        _compress(tar, out["gzip"], [gz, "-6", "-n", "-c"])
    if not out["bzip2"].exists():
        bz = _first_tool("lbzip2", "pbzip2") or "bzip2"
        _compress(tar, out["bzip2"], [bz, "-9", "-c"])
    return out


if __name__ == "__main__":
    import sys

    sc = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    base = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".bench")
    c = make_corpus(base, sc)
    for k, v in make_tarballs(c, base / "tarballs").items():
        print(k, v, v.stat().st_size)
