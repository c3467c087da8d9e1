"""``make bench``: every benchmark, each printing ratios against a baseline from the same run."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("bench_publish", "bench_unpack", "bench_janitor", "bench_ingest", "bench_load",
              "bench_native", "bench_front_door", "bench_replication")


def main() -> int:
    """Run each benchmark module's ``main([])`` in turn; report which ones failed."""
    failed = []
    for name in BENCHMARKS:
        print(f"\n== {name} ==", flush=True)
        try:
            module = importlib.import_module(f"tests.bench.{name}")
        except ModuleNotFoundError as err:
            print(f"skipped: {err}")
            continue
        try:
            module.main([])
        except Exception as err:  # a broken benchmark must not hide the others
            print(f"FAILED: {err!r}")
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
