"""SmolLM2-135M-Instruct: our graphs and quantizations vs onnxruntime-genai and torch, side by side.

Usage (from the repository root, build and dev extras installed):

    .venv/bin/python benchmarks/bench_decode.py [--rounds 3] [--threads 2]
        [--genai-python /work/genai-venv/bin/python --genai-model DIR] [--no-torch]

Each engine runs in a fresh process per round (honest load time and peak memory), the
engines interleaved round after round so that a busy machine slows them alike; the
table holds medians. Two runs per engine and round: a 32-token prompt + 64 greedy
tokens (decode speed), and a 512-token prompt + 1 token (prefill speed). Rows:
optimum's plain graph, the fused graph in fp32 and in the registry's 4-bit variants
(``int4``, ``int4-shared``, ``int4-emb8``, ``gguf``: the GGUF's own blocks), genai's
int4 model run by its own loop, and transformers ``generate`` on torch fp32.

Missing bundles are built first (export from the GGUF, then ``quantize_bundle``);
perplexity per variant (War of the Worlds, 4,096 tokens, 512-token windows) is
measured once and cached in ``bundles/perplexity.json`` keyed by the model's sha256.
Writes the table to ``docs/performance.md`` and a size / perplexity / tokens-per-second
plot to ``docs/performance.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLES = ROOT / "bundles"
OPTIMUM = BUNDLES / "smollm2-135m-instruct"
OPTIMUM_INT4 = BUNDLES / "smollm2-135m-instruct-int4"
FUSED = BUNDLES / "smollm2-fused"
FUSED_INT4 = BUNDLES / "smollm2-fused-int4"
HF_DIR = BUNDLES / "smollm2-hf"  # the GGUF de-quantized once, for the torch row
EVAL_TEXT = ROOT / ".cache/assets/war-of-the-worlds.txt"
PPL_CACHE = BUNDLES / "perplexity.json"
# fused-graph variants: row name -> (bundle folder, registry method)
VARIANTS = {
    "fused int4": (FUSED_INT4, "int4"),
    "fused int4-shared": (BUNDLES / "smollm2-fused-int4-shared", "int4-shared"),
    "fused int4-emb8": (BUNDLES / "smollm2-fused-int4-emb8", "int4-emb8"),
    "fused gguf": (BUNDLES / "smollm2-fused-gguf", "gguf"),
}
GENAI = "onnxruntime-genai int4"
TORCH = "transformers fp32 (torch)"

TORCH_SCRIPT = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir, prompt_tokens, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
load_s = time.perf_counter() - start
text = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the "
        "steps and listening to the sea below, while the ships passed far out in the dark. ")
ids = tokenizer(text)["input_ids"]
ids = torch.tensor([(ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]])
def run(steps):
    begin = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                       min_new_tokens=steps, do_sample=False)
    return time.perf_counter() - begin
run(2)
first = run(1)
total = run(new_tokens + 1) if new_tokens > 1 else first
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"load_s": load_s, "time_to_first_token_s": first,
                  "decode_tokens_per_s": new_tokens / max(total - first, 1e-9),
                  "peak_rss_bytes": peak}))
"""

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
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"load_s": load_s, "time_to_first_token_s": ttft,
                  "decode_tokens_per_s": new_tokens / decode, "peak_rss_bytes": peak}))
"""


def ensure_bundles(variants: dict[str, tuple[Path, str]], torch_row: bool) -> None:
    """Build the missing bundles: fused fp32 from the GGUF, then each registry variant."""
    from export.decoder import ExportOptions, export_decoder
    from quantize.bundle import quantize_bundle

    if not FUSED.exists():
        export_decoder(str(GGUF), FUSED, ExportOptions(graph="fused"))
    for folder, method in variants.values():
        if not folder.exists():
            quantize_bundle(FUSED, folder, method, eval_text=EVAL_TEXT, window=512)
    if torch_row and not HF_DIR.exists():
        from export.source import load_source

        load_source(str(GGUF), HF_DIR.parent / "smollm2-hf-tmp")
        shutil.move(str(HF_DIR.parent / "smollm2-hf-tmp" / "hf"), HF_DIR)
        shutil.rmtree(HF_DIR.parent / "smollm2-hf-tmp", ignore_errors=True)


def perplexities(engines: dict[str, Path]) -> dict[str, float]:
    """Perplexity per bundle on EVAL_TEXT, cached by the graph's sha256."""
    from edge_slm.bundle import read_manifest
    from quantize.perplexity import bundle_perplexity

    cache: dict[str, float] = json.loads(PPL_CACHE.read_text()) if PPL_CACHE.exists() else {}
    found = {}
    for name, bundle in engines.items():
        manifest, checksums = read_manifest(bundle)
        key = f"{checksums.get('model.onnx')}:{EVAL_TEXT.name}:4096:512"
        q = manifest.quantization
        same_text = q.eval_text == EVAL_TEXT.name and q.eval_tokens == 4096
        if key not in cache and q.perplexity_after and same_text:
            cache[key] = q.perplexity_after  # measured by quantize_bundle on the same text
        if key not in cache:
            result = bundle_perplexity(bundle, EVAL_TEXT, window=512, max_tokens=4096)
            cache[key] = result.perplexity
            PPL_CACHE.write_text(json.dumps(cache, indent=1))
        found[name] = cache[key]
    return found


def run_edge(bundle: Path, args: argparse.Namespace, prompt: int, new: int) -> dict[str, float]:
    """One ``edge-slm bench`` process; its JSON result."""
    command = [
        sys.executable, "-m", "edge_slm", "bench", str(bundle), "--json", "--repeats", "1",
        "--prompt-tokens", str(prompt), "--new-tokens", str(new),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_torch(args: argparse.Namespace, prompt: int, new: int) -> dict[str, float]:
    """One transformers ``generate`` process on torch fp32."""
    command = [
        sys.executable,
        "-c",
        TORCH_SCRIPT,
        str(HF_DIR),
        str(prompt),
        str(new),
        str(args.threads),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result["model_bytes"] = sum(p.stat().st_size for p in HF_DIR.glob("*.safetensors"))
    return result


def run_genai(args: argparse.Namespace, prompt: int, new: int) -> dict[str, float]:
    """One onnxruntime-genai process (its own loop and graph)."""
    command = [
        args.genai_python, "-c", GENAI_SCRIPT, args.genai_model, str(prompt), str(new),
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result["model_bytes"] = sum(p.stat().st_size for p in Path(args.genai_model).glob("*.onnx*"))
    return result


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def write_table(
    results: dict[str, list[dict[str, float]]],
    prefill: dict[str, list[dict[str, float]]],
    ppl: dict[str, float],
    args: argparse.Namespace,
) -> str:
    """Markdown table of medians, with ratios to genai and to torch."""
    decode = {name: _median(runs, "decode_tokens_per_s") for name, runs in results.items()}
    genai = decode.get(GENAI)
    torch_speed = decode.get(TORCH)
    bound = max(
        (r["bandwidth_bound_bytes_per_s"] for runs in results.values() for r in runs
         if "bandwidth_bound_bytes_per_s" in r),
        default=0.0,
    )  # fmt: skip
    lines = [
        "| engine | file MiB | perplexity | load s | first token ms | prefill 512 tok/s | "
        "decode tok/s | x genai | x torch | peak RSS MiB | % of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        size = runs[0]["model_bytes"]
        pre = prefill.get(name)
        cells = [
            name,
            f"{size / 2**20:.1f}",
            f"{ppl[name]:.2f}" if name in ppl else "n/a",
            f"{_median(runs, 'load_s'):.2f}",
            f"{1000 * _median(runs, 'time_to_first_token_s'):.0f}",
            f"{args.prefill_tokens / _median(pre, 'time_to_first_token_s'):.0f}" if pre else "n/a",
            f"{decode[name]:.1f}",
            f"{decode[name] / genai:.2f}" if genai else "n/a",
            f"{decode[name] / torch_speed:.2f}" if torch_speed else "n/a",
            f"{_median(runs, 'peak_rss_bytes') / 2**20:.0f}",
            f"{100 * size * decode[name] / bound:.0f}%" if bound and name != TORCH else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMemory bandwidth bound measured: {bound / 1e9:.1f} GB/s.\n"


def plot(
    results: dict[str, list[dict[str, float]]], ppl: dict[str, float], out: Path
) -> Path | None:
    """Scatter of file size vs perplexity, marker area and label = decode tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (dev extra): no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        if name not in ppl:
            continue
        size = runs[0]["model_bytes"] / 2**20
        speed = _median(runs, "decode_tokens_per_s")
        ax.scatter(size, ppl[name], s=20 + 8 * speed, alpha=0.6)
        ax.annotate(f"{name}\n{speed:.0f} tok/s", (size, ppl[name]), fontsize=8)
    ax.set_xlabel("model file (MiB)")
    ax.set_ylabel("perplexity (War of the Worlds, 4,096 tokens)")
    ax.set_title("SmolLM2-135M: size vs perplexity (marker area = decode tok/s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--genai-python", help="python of a venv with onnxruntime-genai 0.18")
    parser.add_argument("--genai-model", help="folder written by genai's builder (-p int4 -e cpu)")
    parser.add_argument("--genai-perplexity", type=float, help="genai's perplexity, if known")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers row")
    parser.add_argument("--no-optimum", action="store_true", help="skip optimum's plain graph")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/performance.md")
    args = parser.parse_args()
    ensure_bundles(VARIANTS, not args.no_torch)
    engines: dict[str, Path] = {}
    if not args.no_optimum and OPTIMUM.exists():
        engines["optimum fp32"] = OPTIMUM
    engines["fused fp32"] = FUSED
    engines.update({name: folder for name, (folder, _) in VARIANTS.items()})
    ppl = perplexities(engines)
    if args.genai_perplexity:
        ppl[GENAI] = args.genai_perplexity
    names = list(engines)
    if args.genai_python and args.genai_model:
        names.append(GENAI)
    if not args.no_torch:
        names.append(TORCH)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    prefill: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            for store, prompt, new in (
                (results, args.prompt_tokens, args.new_tokens),
                (prefill, args.prefill_tokens, 1),
            ):
                if name == GENAI:
                    store[name].append(run_genai(args, prompt, new))
                elif name == TORCH:
                    store[name].append(run_torch(args, prompt, new))
                else:
                    store[name].append(run_edge(engines[name], args, prompt, new))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    ppl[TORCH] = ppl.get("fused fp32", float("nan"))  # same weights, same float math
    table = write_table(results, prefill, ppl, args)
    print(table)
    picture = plot(results, ppl, args.out.with_suffix(".png"))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads"
    args.out.write_text(
        "# Performance: SmolLM2-135M-Instruct\n\n"
        f"Measured {when} on {machine} (a shared machine: medians of {args.rounds} "
        f"interleaved rounds, one fresh process per run), {args.prompt_tokens}-token prompt + "
        f"{args.new_tokens} greedy tokens for decode, a {args.prefill_tokens}-token prompt for "
        "prefill. Perplexity: War of the Worlds, 4,096 tokens, 512-token windows. Reproduce "
        "with `python benchmarks/bench_decode.py --genai-python ... --genai-model ...`.\n\n"
        + table
        + (f"\n![size vs perplexity vs tokens/s]({picture.name})\n" if picture else ""),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
