"""Warm load of a bundle with ``verify=True``: signed stat facts against hashing every file.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_warm_load.py [BUNDLE] [--rounds 9] [--threads 2]

Each round starts two fresh processes in turn, each timing
``edge_slm.load(BUNDLE, threads=THREADS)`` (wall and CPU time of the process, and the
time and bytes spent hashing files) on a prepared-session cache in a private temporary
folder: ``facts`` is the default (a file whose size, mtime, ctime, inode and device
match its signed record is not read; edge_slm/bundle/hash_record.py), ``rehash`` sets
``EDGE_SLM_REHASH=1`` (every file of the bundle and of the cache entry hashed at every
load, as every load did before the records). Before the rounds, two loads build the
entry and record its files, 2.5 s apart (a file changed less than 2 s before it is
hashed is not recorded). Prints one line per load, the medians, and ``uptime``: on a
shared machine other jobs lengthen the wall times; CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import os, resource, sys, time
import edge_slm
from edge_slm.bundle import files, hash_record

spent = [0.0, 0]

def timed(module, name):
    real = getattr(module, name)
    def wrapper(path):
        start = time.perf_counter()
        try:
            return real(path)
        finally:
            spent[0] += time.perf_counter() - start
            spent[1] += os.path.getsize(path)
    setattr(module, name, wrapper)

timed(files, "sha256_file")
timed(hash_record, "hash_file")
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
start, cpu_start = time.perf_counter(), cpu()
model = edge_slm.load(sys.argv[1], threads=int(sys.argv[2]))
print(time.perf_counter() - start, cpu() - cpu_start, spent[0], spent[1], sep="\t")
"""


def load_once(bundle: Path, threads: int, cache: Path, rehash: bool) -> list[float]:
    """[wall s, CPU s, hashing s, hashed bytes] of one load in a fresh process."""
    env = dict(os.environ, EDGE_SLM_CACHE_DIR=str(cache))
    env.pop("EDGE_SLM_REHASH", None)
    if rehash:
        env["EDGE_SLM_REHASH"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(threads)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return [float(x) for x in done.stdout.strip().splitlines()[-1].split("\t")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default="bundles/smollm2-135m-instruct-int4")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundle = Path(args.bundle).resolve()
    with tempfile.TemporaryDirectory(prefix="edge-slm-warm-") as folder:
        cache = Path(folder)
        load_once(bundle, args.threads, cache, rehash=False)  # builds the entry
        time.sleep(2.5)
        load_once(bundle, args.threads, cache, rehash=False)  # records the entry's files
        results: dict[str, list[list[float]]] = {"facts": [], "rehash": []}
        for _ in range(args.rounds):
            for name in results:
                row = load_once(bundle, args.threads, cache, rehash=name == "rehash")
                results[name].append(row)
                wall, cpu, hashing, size = row
                print(
                    f"{name:7s} wall {wall:.3f} s  cpu {cpu:.3f} s  hashing {hashing:.3f} s "
                    f"({int(size) >> 20} MiB)",
                    flush=True,
                )
    for name, rows in results.items():
        wall, cpu, hashing, size = (statistics.median(column) for column in zip(*rows, strict=True))
        print(
            f"{name}: median wall {wall:.3f} s (min {min(r[0] for r in rows):.3f}), "
            f"cpu {cpu:.3f} s, hashing {hashing:.3f} s ({int(size) >> 20} MiB)"
        )
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
