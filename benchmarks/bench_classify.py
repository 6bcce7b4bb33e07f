"""Sentence classification speed and memory: edge_slm vs optimum ORTModel vs transformers.

The same fine-tuned model runs through three engines, each in its own worker process
(so each one's peak RSS is its own and the edge_slm worker never imports torch):

* ``edge_slm``: the bundle through :class:`edge_slm.TextClassifier` (numpy + onnxruntime);
* ``edge_slm-int8``: optional, a quantized bundle through the same runtime;
* ``optimum``: ``ORTModelForSequenceClassification`` (onnxruntime + torch + transformers),
  exported from the same HF folder by optimum into a temporary folder;
* ``torch``: ``transformers.pipeline("text-classification")`` on torch, fp32.

Rounds are interleaved (round 1 of every engine, then round 2...) so a busy machine
slows every engine alike. Each round classifies the same sentences at batch 1
(per-sentence latency), at batch 32 (one call per batch: per-batch latency), and as one
call over the whole list with batch size 32 (``stream32``: what classifying a file does;
each engine batches its own way, edge_slm groups similar lengths). Reported: sentences/s
(median over rounds), latency p50/p95 (all rounds pooled), peak RSS, and the installed
size of each engine's Python environment (the distributions it needs, recursively).

    .venv/bin/python benchmarks/bench_classify.py --hf .cache/sentiment/hf \\
        --bundle .cache/sentiment/bundle-fp32 --int8 .cache/sentiment/bundle-dynamic-int8 \\
        --sentences .cache/sentiment/heldout.jsonl --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# engine -> the distributions a user must install to run it
ENVIRONMENTS = {
    "edge_slm": ["numpy", "onnxruntime", "tokenizers"],
    "edge_slm-int8": ["numpy", "onnxruntime", "tokenizers"],
    "optimum": ["optimum-onnx", "onnxruntime"],
    "torch": ["torch", "transformers"],
}


def _load_engine(
    engine: str, hf: Path, bundle: Path, int8: Path | None, threads: int, tmp: Path
) -> Callable[[list[str], int], Any]:
    """A function classifying sentences, ``batch_size`` at a time, with ``engine``."""
    if engine in ("edge_slm", "edge_slm-int8"):
        import edge_slm

        model = edge_slm.load(
            int8 if engine == "edge_slm-int8" and int8 else bundle, threads=threads
        )
        assert isinstance(model, edge_slm.TextClassifier)
        return lambda texts, batch: list(
            model.classify(texts, batch_size=batch, truncation="silent")
        )
    if engine == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSequenceClassification
        from transformers import AutoTokenizer, pipeline

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        ORTModelForSequenceClassification.from_pretrained(hf, export=True).save_pretrained(tmp)
        ort_model = ORTModelForSequenceClassification.from_pretrained(tmp, session_options=options)
        pipe = pipeline(
            "text-classification", model=ort_model, tokenizer=AutoTokenizer.from_pretrained(hf)
        )
        return lambda texts, batch: pipe(texts, batch_size=batch, truncation=True)
    if engine == "torch":
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        pipe = pipeline("text-classification", model=str(hf), device=-1)
        return lambda texts, batch: pipe(texts, batch_size=batch, truncation=True)
    raise ValueError(f"unknown engine {engine!r}; allowed: {list(ENVIRONMENTS)}")


def worker(args: argparse.Namespace) -> int:
    """Load one engine, then answer ``{"batch": N}`` requests on stdin with timings."""
    sentences = _sentences(args.sentences, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = _load_engine(args.worker, args.hf, args.bundle, args.int8, args.threads, Path(tmp))
        run(sentences[:2], 2)  # warm-up
        load_s = time.perf_counter() - start
        print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            batch, stream = int(request["batch"]), bool(request["stream"])
            latencies = []
            begin = time.perf_counter()
            if stream:  # the whole list in one call, as over a file: the engine batches
                run(sentences, batch)
            else:  # one call per batch: per-batch latency
                for i in range(0, len(sentences), batch):
                    t0 = time.perf_counter()
                    run(sentences[i : i + batch], batch)
                    latencies.append(time.perf_counter() - t0)
            total = time.perf_counter() - begin
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(
                json.dumps(
                    {"per_s": len(sentences) / total, "latencies": latencies, "peak_rss": peak}
                ),
                flush=True,
            )
    return 0


def _sentences(path: Path, n: int) -> list[str]:
    from edge_slm.text.records import read_records

    texts = [r.text for r in read_records(path) if isinstance(r.text, str)]
    return texts[:n]


def _closure(roots: Sequence[str]) -> set[str]:
    """Names of ``roots`` and every distribution they require (markers evaluated)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def installed_size(roots: Sequence[str]) -> int:
    """Bytes on disk of the installed files of ``roots`` and their dependencies."""
    total = 0
    for name in _closure(roots):
        files = metadata.distribution(name).files or []
        for f in files:
            path = Path(str(f.locate()))
            if path.is_file():
                total += path.stat().st_size
    return total


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, required=True, help="HF folder of the classifier")
    parser.add_argument("--bundle", type=Path, required=True, help="its fp32 edge-slm bundle")
    parser.add_argument("--int8", type=Path, help="a quantized bundle of the same model")
    parser.add_argument("--sentences", type=Path, required=True, help="JSONL/CSV/txt texts")
    parser.add_argument("-n", type=int, default=256, help="sentences per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--stream-batch",
        type=int,
        default=32,
        help="also classify all sentences in one call with this batch size (0: skip)",
    )
    parser.add_argument("--engines", nargs="+", default=["edge_slm", "optimum", "torch"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    engines = list(args.engines) + (["edge_slm-int8"] if args.int8 else [])
    base = [sys.executable, __file__, "--hf", str(args.hf), "--bundle", str(args.bundle)]
    base += ["--sentences", str(args.sentences), "-n", str(args.n), "--threads", str(args.threads)]
    if args.int8:
        base += ["--int8", str(args.int8)]
    workers: dict[str, subprocess.Popen[str]] = {}
    loads: dict[str, float] = {}
    for engine in engines:  # loaded one after the other, so loading is not contended
        proc = subprocess.Popen(
            [*base, "--worker", engine],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        loads[engine] = json.loads(proc.stdout.readline())["load_s"]
        workers[engine] = proc
    modes = [(f"batch{b}", b, False) for b in args.batches]
    if args.stream_batch:
        modes.append((f"stream{args.stream_batch}", args.stream_batch, True))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        e: {name: [] for name, _, _ in modes} for e in engines
    }
    for round_ in range(args.rounds):
        for name, batch, stream in modes:
            for engine, proc in workers.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps({"batch": batch, "stream": stream}) + "\n")
                proc.stdin.flush()
                results[engine][name].append(json.loads(proc.stdout.readline()))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for proc in workers.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    summary: dict[str, Any] = {"sentences": args.n, "rounds": args.rounds, "threads": args.threads}
    for engine in engines:
        row: dict[str, Any] = {"load_s": round(loads[engine], 2)}
        for name, _, stream in modes:
            runs = results[engine][name]
            row[name] = {"sentences_per_s": round(statistics.median(r["per_s"] for r in runs), 1)}
            if not stream:
                latencies = [lat for r in runs for lat in r["latencies"]]
                row[name]["p50_ms"] = round(1000 * _percentile(latencies, 0.50), 2)
                row[name]["p95_ms"] = round(1000 * _percentile(latencies, 0.95), 2)
        row["peak_rss_mb"] = round(
            max(r["peak_rss"] for b in results[engine].values() for r in b) / 2**20, 1
        )
        row["installed_mb"] = round(installed_size(ENVIRONMENTS[engine]) / 2**20, 1)
        summary[engine] = row
    if "edge_slm" in summary:
        # how many times faster edge_slm (fp32) is than each other engine (> 1: faster)
        for engine in engines:
            if engine != "edge_slm":
                key = "fp32_vs_this" if engine.startswith("edge_slm") else "edge_slm_speedup"
                summary[engine][key] = {
                    name: round(
                        summary["edge_slm"][name]["sentences_per_s"]
                        / summary[engine][name]["sentences_per_s"],
                        2,
                    )
                    for name, _, _ in modes
                }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
