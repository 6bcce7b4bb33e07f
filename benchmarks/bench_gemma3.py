"""Gemma 3 270M from its Q4_K_M GGUF: our exact transcoding, our 4-bit variant, llama.cpp.

Usage (from the repository root; ``examples/fetch_assets.py --only gemma3`` fetches the
GGUF, ``benchmarks/peers.py --only llama`` builds llama-cpp-python):

    .venv/bin/python benchmarks/bench_gemma3.py [--rounds 3] [--threads 2] [--fp32 DIR]

Builds what is missing: the fp32 fused bundle exported from the GGUF (``--fp32``, default
``bundles/gemma3-270m``; validated against transformers), ``DIR-gguf`` (every block
carried exactly) and ``DIR-gguf-small`` (the Q5_0/Q6_K/Q8_0 tensors re-quantized to 4-bit searched blocks), each
with its perplexity in the manifest (War of the Worlds, 4,096 tokens, 512-token windows,
BOS in front of each). llama.cpp scores the very same token-id windows on the GGUF
(``llama_cpp_perplexity.py``). Decode speed, load time and peak RSS: ``edge-slm bench``
(32-token prompt, 64 new tokens) for our bundles, a 64-token greedy completion timed the
same way for llama.cpp, fresh process each, interleaved round after round; medians.
Prints a Markdown table. Caveat: the llama.cpp decode figure goes through
llama-cpp-python's ``generate``, whose per-token sampling handles the 262,144-entry
vocabulary in Python; measured 4-7 tok/s here, far below llama.cpp's own kernels
(about 73 tok/s measured separately on this machine): not a fair engine comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".cache/assets/gemma-3-270m-q4_k_m.gguf"
EVAL_TEXT = ROOT / ".cache/assets/war-of-the-worlds.txt"
FP32 = ROOT / "bundles/gemma3-270m"
LLAMA_PYTHON = ROOT / ".cache/peers/llama-venv/bin/python"
EDGE_SLM = ROOT / ".venv/bin/edge-slm"
WINDOW, TOKENS = 512, 4096

LLAMA_DECODE = r"""
import json, resource, sys, time
from llama_cpp import Llama
start = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), verbose=False)
loaded = time.perf_counter()
prompt = list(range(1000, 1032))
for name, count in (("short", 2), ("long", 66)):
    llm.reset()
    t0 = time.perf_counter()
    n = 0
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        n += 1
        if n == count:
            break
    if name == "short":
        short = time.perf_counter() - t0
    else:
        long = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": loaded - start, "decode_tok_s": 64 / (long - short), "peak_rss_mib": rss}))
"""


def bundles(fp32: Path) -> dict[str, Path]:
    """The fp32 bundle and its two transcodings (built when missing)."""
    from edge_slm_export.decoder import ExportOptions, export_decoder
    from edge_slm_quantize.bundle import quantize_bundle

    if not (fp32 / "manifest.json").is_file():
        export_decoder(str(GGUF), fp32, ExportOptions(graph="fused", overwrite=True))
    out = {"fp32": fp32}
    for method in ("gguf", "gguf-small"):
        target = fp32.with_name(f"{fp32.name}-{method}")
        if not (target / "manifest.json").is_file():
            quantize_bundle(fp32, target, method, eval_text=EVAL_TEXT, overwrite=True)
        out[method] = target
    return out


def llama_perplexity(bundle: Path) -> float:
    """llama.cpp's perplexity on the GGUF over the windows our perplexity scores."""
    from tokenizers import Tokenizer

    from edge_slm.bundle import read_bundle
    from edge_slm.generation.perplexity import (
        bos_for_scoring,
        encode_text,
        read_text,
        token_windows,
    )

    manifest = read_bundle(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / manifest.files["tokenizer"]))
    ids = encode_text(tokenizer, read_text(EVAL_TEXT), TOKENS)
    windows = [w[0].tolist() for w in token_windows(ids, WINDOW, bos_for_scoring(manifest))]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(windows, f)
    script = ROOT / "benchmarks/llama_cpp_perplexity.py"
    done = subprocess.run(
        [str(LLAMA_PYTHON), str(script), str(GGUF), f.name],
        check=True,
        capture_output=True,
        text=True,
    )
    Path(f.name).unlink()
    return float(json.loads(done.stdout)["perplexity"])


def ours(bundle: Path, threads: int) -> dict[str, float]:
    command = [str(EDGE_SLM), "bench", str(bundle), "--json", "--repeats", "1"]
    done = subprocess.run(
        [*command, "--threads", str(threads), "--no-spinning"],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout)
    return {
        "decode_tok_s": float(result["decode_tokens_per_s"]),
        "load_s": float(result["load_s"]),
        "peak_rss_mib": float(result["peak_rss_bytes"]) / 2**20,
    }


def llama(threads: int) -> dict[str, float]:
    done = subprocess.run(
        [str(LLAMA_PYTHON), "-c", LLAMA_DECODE, str(GGUF), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {k: float(v) for k, v in json.loads(done.stdout).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", type=Path, default=FP32, help="the fp32 bundle folder")
    parser.add_argument(
        "--no-llama-perplexity",
        action="store_true",
        help="skip llama.cpp's perplexity (minutes; llama_cpp_perplexity.py gives it alone)",
    )
    args = parser.parse_args()
    from edge_slm.bundle import read_bundle
    from edge_slm_quantize.bundle import graph_size

    built = bundles(args.fp32)
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name in ("gguf", "gguf-small", "llama.cpp"):
            result = llama(args.threads) if name == "llama.cpp" else ours(built[name], args.threads)
            for key, value in result.items():
                rows.setdefault(name, {}).setdefault(key, []).append(value)
    print("| engine | file MiB | perplexity | decode tok/s | load s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        if name == "llama.cpp":
            size = GGUF.stat().st_size
            ppl = float("nan") if args.no_llama_perplexity else llama_perplexity(built["gguf"])
        else:
            quant = read_bundle(built[name]).quantization
            size, ppl = graph_size(built[name] / "model.onnx"), quant.perplexity_after or 0.0
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(
            f"| {name} | {size / 2**20:.1f} | {ppl:.3f} | {med['decode_tok_s']:.1f} | "
            f"{med['load_s']:.2f} | {med['peak_rss_mib']:.0f} |"
        )
    fp32 = read_bundle(built["gguf"]).quantization.perplexity_before
    print(f"\nfp32 graph (the GGUF de-quantized) perplexity: {fp32}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
