"""Gemma 3 270M from its Q4_K_M GGUF, every engine measured the way `make bench` measures
SmolLM2.

Rows (issue 13):

- **ours exact** (``gguf``): every GGUF block carried into MatMulNBits, each weight equal
  to ``gguf``'s own de-quantization (Q4_K/Q6_K/Q5_0/Q8_0 as the file has them);
- **ours small** (``gguf-small``): the Q4_K blocks carried, the rest re-quantized to our
  4-bit searched blocks;
- **onnxruntime-genai int4**: its own builder run on the GGUF de-quantized to an HF folder
  (``benchmarks/peers.py``; genai cannot read a GGUF);
- **llama.cpp** on the GGUF itself, twice: through llama-cpp-python's ``Llama.generate``
  (a Python loop like ours and genai's) and through llama.cpp's own ``llama-bench`` (C++,
  no Python at all).

The method is ``benchmarks/bench_decode.py``'s, with its child scripts: each engine in its
own fresh process per round, rounds interleaved and each starting with another engine,
the same prompt ids (Gemma's tokenizer), greedy with end-of-text never stopping a run,
decode rate = (tokens(130) - tokens(2)) / (t(130) - t(2)), first token = the 32-token
prompt + 1 token, prefill = a 512-token prompt + 1 token, load = start-up in the fresh
process (our rows from the prepared-session cache, built before the rounds), medians and
per-round ratios. Perplexity: War of the Worlds, 4,096 tokens, 512-token windows with
BOS in front, the same token ids for every engine (ours: the manifests, measured by
``quantize_bundle``; genai: its graph scored with NumPy like our bundles; llama.cpp:
``llama_cpp_perplexity.py`` on the same windows).

Usage (from the repository root; ``examples/fetch_assets.py --only gemma3`` fetches the
GGUF, ``benchmarks/peers.py`` sets up genai and llama.cpp)::

    .venv/bin/python benchmarks/bench_gemma3.py [--rounds 3] [--threads 2]

Builds what is missing (``bundles/gemma3-270m``, ``-gguf``, ``-gguf-small``, the HF folder
``bundles/gemma3-hf`` and ``.cache/peers/genai-gemma3-int4``), prints the Markdown table
and writes it to ``docs/performance-gemma3.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bench_decode as bd  # the method, its child scripts and helpers
import peers

ROOT = peers.ROOT
GGUF = ROOT / ".cache/assets/gemma-3-270m-q4_k_m.gguf"
EVAL_TEXT = bd.EVAL_TEXT
FP32 = ROOT / "bundles/gemma3-270m"
HF = ROOT / "bundles/gemma3-hf"
GENAI_MODEL = peers.PEERS / "genai-gemma3-int4"
WINDOW, TOKENS = 512, 4096
OURS_EXACT, OURS_SMALL = "ours exact (gguf)", "ours small (gguf-small)"
GENAI = "onnxruntime-genai int4 (from the de-quantized weights)"
LLAMA_PY = "llama.cpp Q4_K_M GGUF (llama-cpp-python)"
LLAMA_BENCH = "llama.cpp Q4_K_M GGUF (llama-bench)"


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


def llama_perplexity(bundle: Path, llama_python: Path) -> float:
    """llama.cpp's perplexity on the GGUF over the windows our perplexity scores (cached
    in ``bundles/perplexity.json`` by the GGUF's size and the windows' sha256)."""
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
    text = json.dumps(windows)
    key = f"llama.cpp:{GGUF.name}:{GGUF.stat().st_size}:{hashlib.sha256(text.encode()).hexdigest()}"
    cache = json.loads(bd.PPL_CACHE.read_text()) if bd.PPL_CACHE.exists() else {}
    if key not in cache:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(text)
        script = ROOT / "benchmarks/llama_cpp_perplexity.py"
        done = subprocess.run(
            [str(llama_python), str(script), str(GGUF), f.name],
            check=True,
            capture_output=True,
            text=True,
        )
        Path(f.name).unlink()
        cache[key] = float(json.loads(done.stdout)["perplexity"])
        bd.PPL_CACHE.write_text(json.dumps(cache, indent=1))
    return float(cache[key])


def run_engine(name: str, spec: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """One measurement of ``name`` in its own fresh process (bench_decode's children)."""
    spec = dict(spec)
    if name == GENAI:
        python, script, spec["model"] = peer["genai_python"], bd.GENAI_SCRIPT, str(GENAI_MODEL)
    elif name == LLAMA_PY:
        python, script, spec["model"] = peer["llama_python"], bd.LLAMA_SCRIPT, str(GGUF)
    elif name == LLAMA_BENCH:
        python, script, spec["model"] = sys.executable, bd.LLAMA_BENCH_SCRIPT, str(GGUF)
        spec["binary"] = peer["llama_bench"]
    else:
        python, script, spec["model"] = sys.executable, bd.EDGE_SCRIPT, str(peer["bundles"][name])
    return bd.run_child(str(python), script, spec)


def file_mib(name: str, peer: dict[str, Any]) -> float:
    if name in (LLAMA_PY, LLAMA_BENCH):
        return GGUF.stat().st_size / 2**20
    folder = GENAI_MODEL if name == GENAI else peer["bundles"][name]
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20


def weight_mb_per_token(name: str, peer: dict[str, Any]) -> float:
    """MB of weights one decode step reads (bench_decode's rule: a table only looked up
    counts one row; Gemma's tied table is also the lm_head, so it counts whole)."""
    if name in (LLAMA_PY, LLAMA_BENCH):
        return bd._gguf_bytes_per_token(GGUF) / 1e6
    folder = GENAI_MODEL if name == GENAI else peer["bundles"][name]
    return bd._onnx_bytes_per_token(folder / "model.onnx") / 1e6


def table(
    results: dict[str, list[dict[str, float]]],
    ppl: dict[str, float],
    peer: dict[str, Any],
    prefill: int,
) -> str:
    """Markdown table of medians, with per-round decode ratios to llama.cpp and genai."""

    def cell(value: float, fmt: str) -> str:
        return "n/a" if value != value else format(value, fmt)

    llama_ppl = ppl.get(LLAMA_PY, float("nan"))
    lines = [
        f"| engine | file MiB | perplexity | vs llama.cpp's perplexity | load s | first token ms "
        f"| prefill {prefill} tok/s | decode tok/s | x llama-bench (rounds) | "
        "x llama-cpp-python (rounds) | x genai (rounds) | peak RSS MiB | weights MB read "
        "per token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        rates = [bd._prefill_rate(r, prefill) for r in runs]
        p = ppl.get(name, float("nan"))
        cells = [
            name,
            f"{file_mib(name, peer):.1f}",
            cell(p, ".2f"),
            cell(100 * (p / llama_ppl - 1), "+.2f") + ("%" if p == p and llama_ppl else ""),
            cell(bd._median(runs, "load_s"), ".2f"),
            cell(1000 * bd._median(runs, "time_to_first_token_s"), ".0f"),
            cell(bd._median(rates, "rate"), ".0f"),
            f"{bd._median(runs, 'decode_tokens_per_s'):.1f}",
            bd._rounds(runs, results.get(LLAMA_BENCH), "decode_tokens_per_s"),
            bd._rounds(runs, results.get(LLAMA_PY), "decode_tokens_per_s"),
            bd._rounds(runs, results.get(GENAI), "decode_tokens_per_s"),
            f"{bd._median(runs, 'peak_rss_bytes') / 2**20:.0f}",
            f"{weight_mb_per_token(name, peer):.1f}",
        ]
        lines.append("| " + " | ".join(cells).replace("n/a%", "n/a") + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", type=Path, default=FP32, help="the fp32 bundle folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/performance-gemma3.md")
    args = parser.parse_args()
    if not GGUF.is_file():
        print(f"missing {GGUF}: run examples/fetch_assets.py --only gemma3", file=sys.stderr)
        return 1
    from edge_slm.bundle import read_bundle

    built = bundles(args.fp32)
    try:
        genai_python = peers.ensure_genai_venv()
        peers.ensure_genai_model(genai_python, peers.ensure_hf_dir(HF, GGUF), GENAI_MODEL)
        llama = peers.ensure_llama(python=True, server=True)
    except peers.PeerError as error:
        print(f"setting up the peers failed: {error}", file=sys.stderr)
        return 1
    peer = {
        "genai_python": genai_python,
        "llama_python": llama.python,
        "llama_bench": str(peers.llama_bench_binary()),
        "bundles": {OURS_EXACT: built["gguf"], OURS_SMALL: built["gguf-small"]},
    }
    ppl = {
        OURS_EXACT: read_bundle(built["gguf"]).quantization.perplexity_after or float("nan"),
        OURS_SMALL: read_bundle(built["gguf-small"]).quantization.perplexity_after or float("nan"),
        GENAI: bd.genai_perplexity(GENAI_MODEL, built["fp32"]),
        LLAMA_PY: llama_perplexity(built["gguf"], Path(str(llama.python))),
    }
    ppl[LLAMA_BENCH] = ppl[LLAMA_PY]
    fp32_ppl = read_bundle(built["gguf"]).quantization.perplexity_before
    tokenizer = built["fp32"] / "tokenizer.json"
    spec = {
        "ids": bd.prompt_ids(32, tokenizer),
        "prefill_ids": bd.prompt_ids(512, tokenizer),
        "short": 2,
        "long": 130,
        "threads": args.threads,
    }
    for name in (OURS_EXACT, OURS_SMALL):  # each bundle's prepared-session cache, untimed
        run_engine(name, {**spec, "short": 1, "long": 2, "prefill_ids": [2, 3]}, peer)
    names = [OURS_EXACT, OURS_SMALL, GENAI, LLAMA_PY, LLAMA_BENCH]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(run_engine(name, spec, peer))
        print(f"round {round_ + 1}/{args.rounds}: load average {os.getloadavg()}", file=sys.stderr)
    load_after = os.getloadavg()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        "# Gemma 3 270M (Q4_K_M GGUF): ours exact, ours small, llama.cpp, onnxruntime-genai\n\n"
        f"Measured {when} on {platform.machine()}, {bd._cpu_name()}, {args.threads} "
        f"threads (a shared machine), {args.rounds} interleaved rounds by "
        "`benchmarks/bench_gemma3.py` (method in its docstring: `make bench`'s). Load "
        f"average at the start {load_before[0]:.1f}, at the end {load_after[0]:.1f}. "
        f"fp32 graph (the GGUF de-quantized) perplexity: {fp32_ppl:.2f}. llama-bench has no "
        "load or first-token figure (its own C++ loop).\n\n"
        + table(results, ppl, peer, len(spec["prefill_ids"]))
    )
    print(text)
    args.out.write_text(text, encoding="utf-8")
    (args.out.with_suffix(".json")).write_text(
        json.dumps({"runs": results, "perplexity": ppl}, indent=1), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
