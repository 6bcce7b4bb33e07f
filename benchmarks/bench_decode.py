"""Decode speed of SmolLM2-135M-Instruct: optimum graph vs fused graph (fp32, int4), side by side.

Usage (from the repository root, build stage installed):

    .venv/bin/python benchmarks/bench_decode.py [--rounds 5] [--threads 2]
        [--genai-python /work/genai-venv/bin/python --genai-model DIR]

Each engine runs in a fresh process per round (honest load time and peak memory), the
engines interleaved round after round so that a busy machine slows them alike; the
table holds medians. Missing bundles are built first: the fused fp32 bundle from the
GGUF (``edge-slm export --graph fused``) and its int4 copy (``quantize.weight_only``
with the int4 method's defaults). The table goes to ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLES = ROOT / "bundles"
OPTIMUM = BUNDLES / "smollm2-135m-instruct"
OPTIMUM_INT4 = BUNDLES / "smollm2-135m-instruct-int4"
FUSED = BUNDLES / "smollm2-fused"
FUSED_INT4 = BUNDLES / "smollm2-fused-int4"

GENAI_SCRIPT = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime_genai as og
model_dir, prompt_tokens, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
model = og.Model(model_dir)
tokenizer = og.Tokenizer(model)
load_s = time.perf_counter() - start
text = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the "
        "steps and listening to the sea below, while the ships passed far out in the dark. ")
ids = list(tokenizer.encode(text))
ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
def run(steps):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_tokens + steps + 1, do_sample=False)
    gen = og.Generator(model, params)
    begin = time.perf_counter()
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    gen.generate_next_token()
    first = time.perf_counter()
    for _ in range(steps):
        gen.generate_next_token()
    return first - begin, time.perf_counter() - first
run(4)
ttft, decode = run(new_tokens)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": load_s, "time_to_first_token_s": ttft,
                  "decode_tokens_per_s": new_tokens / decode, "peak_rss_bytes": peak}))
"""


def ensure_bundles() -> None:
    """Build the fused fp32 and int4 bundles if they are missing."""
    from edge_slm.bundle import Quantization, read_bundle, write_manifest

    if not FUSED.exists():
        from export.decoder import ExportOptions, export_decoder

        export_decoder(str(GGUF), FUSED, ExportOptions(graph="fused"))
    if not FUSED_INT4.exists():
        import onnx

        from quantize.methods import get_method
        from quantize.weight_only import quantize_weights

        # quantize.bundle.quantize_bundle opens the graph with DecoderModel, which does
        # not drive the fused layout yet: quantize the graph directly.
        settings = get_method("int4").defaults
        manifest = read_bundle(FUSED)
        result = quantize_weights(onnx.load(str(FUSED / "model.onnx")), settings)
        FUSED_INT4.mkdir(parents=True)
        onnx.save_model(result.model, str(FUSED_INT4 / "model.onnx"))
        shutil.copy2(FUSED / "tokenizer.json", FUSED_INT4 / "tokenizer.json")
        quantization = Quantization(
            method="int4",
            bits=settings.bits,
            block_size=settings.block_size,
            symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level,
            size_before_bytes=(FUSED / "model.onnx").stat().st_size,
            size_after_bytes=(FUSED_INT4 / "model.onnx").stat().st_size,
            details=result.details(),
        )
        write_manifest(FUSED_INT4, replace(manifest, quantization=quantization))


def run_edge(bundle: Path, args: argparse.Namespace) -> dict[str, float]:
    """One ``edge-slm bench`` process; its JSON result."""
    command = [
        sys.executable, "-m", "edge_slm", "bench", str(bundle), "--json", "--repeats", "1",
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_genai(args: argparse.Namespace) -> dict[str, float]:
    """One onnxruntime-genai process (its own loop and graph)."""
    command = [
        args.genai_python, "-c", GENAI_SCRIPT, args.genai_model,
        str(args.prompt_tokens), str(args.new_tokens),
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result["model_bytes"] = sum(p.stat().st_size for p in Path(args.genai_model).glob("*.onnx*"))
    return result


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def write_table(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    """Markdown table of medians, with ratios to the optimum fp32 graph."""
    base = _median(results["optimum fp32"], "decode_tokens_per_s")
    bound = max(
        (r["bandwidth_bound_bytes_per_s"] for runs in results.values() for r in runs
         if "bandwidth_bound_bytes_per_s" in r),
        default=0.0,
    )  # fmt: skip
    lines = [
        "| engine | file MiB | load s | first token ms | prompt tok/s | decode tok/s | "
        "x optimum fp32 | peak RSS MiB | % of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        decode = _median(runs, "decode_tokens_per_s")
        ttft = _median(runs, "time_to_first_token_s")
        size = runs[0]["model_bytes"]
        share = f"{100 * size * decode / bound:.0f}%" if bound else "n/a"
        lines.append(
            f"| {name} | {size / 2**20:.1f} | {_median(runs, 'load_s'):.2f} | {1000 * ttft:.0f} "
            f"| {args.prompt_tokens / ttft:.0f} | {decode:.1f} | {decode / base:.2f} "
            f"| {_median(runs, 'peak_rss_bytes') / 2**20:.0f} | {share} |"
        )
    return "\n".join(lines) + f"\n\nMemory bandwidth bound measured: {bound / 1e9:.1f} GB/s.\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--genai-python", help="python of a venv with onnxruntime-genai 0.18")
    parser.add_argument("--genai-model", help="folder written by genai's builder (-p int4 -e cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/performance.md")
    args = parser.parse_args()
    ensure_bundles()
    engines = {"optimum fp32": OPTIMUM, "fused fp32": FUSED, "fused int4": FUSED_INT4}
    if OPTIMUM_INT4.exists():
        engines["optimum int4"] = OPTIMUM_INT4
    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    if args.genai_python and args.genai_model:
        results["onnxruntime-genai int4"] = []
    for round_ in range(args.rounds):
        for name, bundle in engines.items():
            results[name].append(run_edge(bundle, args))
        if "onnxruntime-genai int4" in results:
            results["onnxruntime-genai int4"].append(run_genai(args))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    table = write_table(results, args)
    print(table)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads"
    args.out.write_text(
        "# Performance: SmolLM2-135M-Instruct decoding\n\n"
        f"Measured {when} on {machine} (a shared machine: medians of {args.rounds} "
        f"interleaved rounds, one fresh process per run), {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} greedy tokens. Reproduce with `python benchmarks/bench_decode.py`.\n\n"
        + table,
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
