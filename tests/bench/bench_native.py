"""cvmfs-native benchmark: a real publisher process against GNU tar, measured in the same run.

1. Publishing the ~500 MB gzip corpus tarball into a fresh cvmfs-native repository (from the
   rename into ``incoming/`` until the published manifest lists the CID; every object is new)
   divided by ``tar -xzf`` of it into a fresh directory; runs alternate back to back after one
   warm-up of each; goal <= 2.0.
2. Republishing the tarball with 5 % of its files changed (small files edited, a large file
   with bytes inserted in the middle) under a new CID: the object bytes it adds, divided by
   the object bytes the first publish added; goal <= 10 %. Its time against ``tar -xzf`` of
   it shows what the content index saves (unchanged content is not compressed again).

Objects must be compressed exactly as CernVM-FS does (zlib's default level; see
``docs/cvmfs-format.md``), which costs far more CPU than ``tar -xzf``'s inflate: the floor
printed is zlib alone on the corpus content (a 1/8 sample of every file, timed on one core)
spread over every core, against ``tar -xzf``.

    python -m tests.bench.bench_native [--scale 1.0] [--runs 3] [--dir .bench]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

from publisher.repositories.cvmfs_native import NativeReader
from spool.names import encode_name
from tests.bench.corpus import make_corpus, make_tarballs
from tests.helpers import Daemon, run_userpub, write_config
from userpub.config import load_config
from userpub.fsutil import remove_tree

REPO = "repo1.example.org"


def _objects(root: Path) -> dict[str, int]:
    out = {}
    data = root / "data"
    for sub in os.scandir(data):
        if sub.name == "txn":
            continue
        for entry in os.scandir(sub.path):
            out[sub.name + entry.name] = entry.stat().st_size
    return out


def _publish(incoming: Path, reader: NativeReader, tarball: Path, cid: str) -> float:
    staging = incoming.parent / "tmp" / f"{encode_name(cid)}.part"
    os.link(tarball, staging)  # same filesystem: the drop is a rename, as an operator's mv
    start = time.monotonic()
    os.rename(staging, incoming / encode_name(cid))
    while not reader.contains(cid):
        time.sleep(0.005)
    return time.monotonic() - start


def _tar(tarball: Path, dest: Path) -> float:
    dest.mkdir(parents=True)
    start = time.monotonic()
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    return time.monotonic() - start


def zlib_seconds(plain_tar: Path, sample: int = 8) -> float:
    """CPU seconds zlib's default level needs for every file of the tar (from a 1/sample slice)."""
    spent = 0.0
    with tarfile.open(plain_tar) as tar:
        for member in tar:
            if member.isreg() and member.size:
                data = tar.extractfile(member).read(max(1, member.size // sample))  # type: ignore[union-attr]
                start = time.process_time()
                zlib.compress(data)
                spent += time.process_time() - start
    return spent * sample


def changed_tarball(plain_tar: Path, out: Path, fraction: float = 0.05, seed: int = 5) -> int:
    """Write ``out`` (.tar.gz): ``plain_tar`` with ``fraction`` of its files changed."""
    rng = random.Random(seed)
    tmp = out.with_suffix(".tmp")
    changed = 0
    with tarfile.open(plain_tar) as src, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
            if data is not None and rng.random() < fraction:
                changed += 1
                middle = len(data) // 2
                if len(data) > 1 << 20:  # insert bytes in the middle of a large file
                    data = data[:middle] + b"inserted by the benchmark" + data[middle:]
                else:  # edit a small file
                    data = data[:middle] + b"# changed\n" + data[middle + 10:]
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    gz = shutil.which("pigz") or "gzip"
    with open(tmp, "rb") as fin, open(out, "wb") as fout:
        subprocess.run([gz, "-6", "-n", "-c"], stdin=fin, stdout=fout, check=True)
    tmp.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=".bench")
    parser.add_argument("--durable", choices=("true", "false"), default="true")
    args = parser.parse_args(argv)
    base = Path(args.dir).resolve()
    corpus = make_corpus(base, args.scale)
    tarballs = make_tarballs(corpus, base / "tarballs")
    work = base / f"native-{os.getpid()}"
    config_path = write_config(work / "site", repos=args.runs + 1, rescan=5.0,
                               backend="cvmfs-native")
    text = config_path.read_text().replace("durable = false", f"durable = {args.durable}")
    config_path.write_text(text)
    config = load_config(config_path)
    incoming = config.server.spool / "incoming"
    gz = tarballs["gzip"]
    print(f"# corpus: {gz.stat().st_size / 1e6:.0f} MB gzip, {os.cpu_count()} cores, "
          f"durable={args.durable}; command: python -m tests.bench.bench_native "
          f"--scale {args.scale:g} --runs {args.runs}")
    ours: list[float] = []
    theirs: list[float] = []
    pub = None
    try:
        # every run publishes into a fresh repository (all objects new), alternating with tar
        for i, repo in enumerate(config.repositories):
            run_userpub(config_path, "keys", "init", repo.name)
            assert repo.root is not None
            reader = NativeReader(repo.name, repo.root, "sw", "ts", repo.mount)
            pub = Daemon(config_path, "publisher", "--repo", repo.name,
                         log=work / f"publisher{i}.log")
            pub.wait_log("publisher ready")
            elapsed_tar = _tar(gz, work / f"tar-{i}")
            before = _objects(repo.root)
            elapsed = _publish(incoming, reader, gz, f"run/{i}")
            pub.stop()  # one publisher at a time: each claims whatever is in incoming/
            pub = None
            if i == 0:  # warm-up of both (page cache, first-touch memory), not counted
                first = _objects(repo.root)
                first_bytes = sum(v for k, v in first.items() if k not in before)
                first_repo, first_reader = repo, reader
                continue
            theirs.append(elapsed_tar)
            ours.append(elapsed)
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"publish gzip into cvmfs-native: userpub median {statistics.median(ours):.2f} s "
              f"(runs {', '.join(f'{x:.2f}' for x in ours)}), tar -xzf median "
              f"{statistics.median(theirs):.2f} s (runs {', '.join(f'{x:.2f}' for x in theirs)})"
              f"; ratio {ratio:.2f} (goal <= 2.0) {'OK' if ratio <= 2.0 else 'MISSED'}")
        cores = os.cpu_count() or 1
        floor = zlib_seconds(tarballs["none"])
        print(f"compression floor: zlib default level over the content {floor:.1f} s on one "
              f"core, {floor / cores:.2f} s on {cores} cores = ratio "
              f"{floor / cores / statistics.median(theirs):.2f} of tar -xzf alone")
        print(f"objects of one publish: {len(first) - len(before)} objects, "
              f"{first_bytes / 1e6:.0f} MB stored for {sum(1 for _ in corpus.rglob('*'))} "
              "entries")
        pub = Daemon(config_path, "publisher", "--repo", first_repo.name,
                     log=work / "publisher-again.log")
        pub.wait_log("publisher ready")
        assert first_repo.root is not None
        edited = work / "changed.tar.gz"
        changed = changed_tarball(tarballs["none"], edited)
        old = _objects(first_repo.root)
        tar_again = _tar(edited, work / "tar-changed")
        again = _publish(incoming, first_reader, edited, "changed/0")
        new = {k: v for k, v in _objects(first_repo.root).items() if k not in old}
        share = sum(new.values()) / first_bytes
        print(f"republish with {changed} files changed (5 %): {len(new)} new objects, "
              f"{sum(new.values()) / 1e6:.1f} MB = {share * 100:.1f} % of the first publish "
              f"(goal <= 10 %) {'OK' if share <= 0.10 else 'MISSED'}; took {again:.2f} s, "
              f"tar -xzf {tar_again:.2f} s: ratio {again / tar_again:.2f}")
    finally:
        if pub is not None:
            pub.stop()
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
