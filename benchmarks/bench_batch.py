"""Rows/s of ``edge-slm batch`` here and on Ray against ``edge-slm classify --input``.

    python benchmarks/bench_batch.py BUNDLE --rows 3000 --rounds 2

Texts are sentences of a local text file (default: the War of the Worlds text of
.cache/assets), cut to at most 12 words (kiosk- or ticket-sized). Each configuration is one command run from
start to end (model load, and for Ray the local cluster's start, included), the rounds
interleaved so that a busy machine slows all of them alike; the table gives the median
of each. ``ray.init(num_cpus=2)`` + ``ray.shutdown()`` alone is timed too, so the Ray
overhead per row can be told apart from the cluster's start. Needs the ray extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / ".cache" / "assets" / "war-of-the-worlds.txt"


def sentences(path: Path, rows: int, max_words: int) -> list[str]:
    """``rows`` sentences cut to ``max_words`` words (repeated if the text is short)."""
    words = path.read_text(encoding="utf-8").split()
    text = " ".join(words)
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]
    found = [" ".join(s.split()[:max_words]) for s in found]
    return [found[i % len(found)] for i in range(rows)]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def ray_start_s() -> float:
    code = "import ray; ray.init(num_cpus=2, include_dashboard=False); ray.shutdown()"
    return timed([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-words", type=int, default=12, help="words per text at most")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=250)
    args = parser.parse_args()
    edge = [sys.executable, "-m", "edge_slm.cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.jsonl"
        with open(source, "w", encoding="utf-8") as fh:
            for i, text in enumerate(sentences(args.text, args.rows, args.max_words)):
                fh.write(json.dumps({"id": i, "text": text}) + "\n")
        out = str(Path(tmp) / "out.jsonl")
        batch = [*edge, "batch", str(args.bundle), str(source), out, "--no-progress"]
        batch += ["--block-size", str(args.block_size)]
        configs = {
            "classify --input, 2 threads": [
                *edge,
                "classify",
                str(args.bundle),
                "--input",
                str(source),
                "--output",
                out,
                "--no-progress",
                "--threads",
                "2",
            ],
            "batch, in process, 2 threads": [*batch, "--threads", "2"],
            "batch, in process, 1 thread": [*batch, "--threads", "1"],
            "batch --workers 1 (Ray, 1 CPU)": [*batch, "--workers", "1"],
            "batch --workers 2 (Ray, 1 CPU each)": [*batch, "--workers", "2"],
        }
        # the first load of a bundle writes its prepared-session cache: not timed
        timed([*edge, "classify", str(args.bundle), "warm up"])
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {name: [] for name in configs}
        starts = []
        for _ in range(args.rounds):
            starts.append(ray_start_s())
            for name, command in configs.items():
                times[name].append(timed(command))
        load_after = os.getloadavg()
    base = statistics.median(times["classify --input, 2 threads"])
    print(
        f"{args.rows} rows of at most {args.max_words} words, {args.rounds} round(s), "
        f"block size {args.block_size}"
    )
    print(f"load average before {load_before}, after {load_after}")
    print(f"ray.init(num_cpus=2) + shutdown: {statistics.median(starts):.1f} s (median)\n")
    print("| command | seconds (median) | rows/s | vs classify --input, 2 threads |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {args.rows / median:.0f} | {base / median:.2f}x |")
    print("\nall runs (s):", json.dumps({k: [round(v, 1) for v in vs] for k, vs in times.items()}))


if __name__ == "__main__":
    main()
