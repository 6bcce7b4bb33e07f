"""Start-up of SmolLM2-135M: edge-slm without and with the prepared-session cache vs genai.

Usage: ``make bench-cold``, or from the repository root (genai's venv and model come
from ``benchmarks/peers.py``; missing bundles of ``make bench`` are built first):

    .venv/bin/python benchmarks/bench_cold_load.py [--rounds 5] [--threads 2]
        [--bundles bundles/smollm2-fused-int4-search ...] [--no-genai]

Each round starts one fresh process per engine, in an order that rotates from round to
round (a busy moment slows every engine of the round alike). Engines:

* ``cold``: ``edge_slm.load(BUNDLE, cache=False)`` for each bundle: no prepared-session
  cache and no signed hash records, so every file is hashed and onnxruntime optimizes
  the graph and pre-packs the weights;
* ``cold, verify=False``: the same without the checksums (first bundle only): what
  hashing costs;
* ``warm``: ``edge_slm.load(BUNDLE)`` from a prepared-session cache in a private temporary
  folder, built (and its files recorded) before the rounds;
* genai: ``og.Model(MODEL)`` (what ``bench_decode.py`` times as genai's load) and
  ``og.Tokenizer(model)``: ``edge_slm.load`` loads the tokenizer too, so "genai model +
  tokenizer" is the like-for-like figure.

Every child times its imports (``import edge_slm`` / ``import onnxruntime_genai``), the
load, and the first token (the same 32 prompt ids, greedy, one new token): ``load + first
token`` is what a user waits for after the imports. edge-slm children also split the
load into hashing, tokenizer, graph walks (external-data and position-table checks) and
onnxruntime session creation (the tokenizer parses on a second core while onnxruntime
builds the session: those two overlap). Children import from bytecode written to the
private folder first. Prints medians, per-round ratios against genai's load (median and every round's), and
the load average of every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peers  # benchmarks/peers.py: genai's venv and model
from bench_decode import VARIANTS, ensure_bundles, prompt_ids, run_child
from peers import ROOT

BUNDLES = (
    ROOT / "bundles/smollm2-fused-int4-search",
    ROOT / "bundles/smollm2-fused-gguf-head4",
    ROOT / "bundles/smollm2-fused-gguf",
)

EDGE_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
begin = time.perf_counter()
import edge_slm
import onnxruntime as ort
from edge_slm.bundle import files
from edge_slm.generation import model as model_module
import_s = time.perf_counter() - begin
spent = {"hash_s": 0.0, "tokenizer_s": 0.0, "graph_walk_s": 0.0, "session_s": 0.0}

def timed(owner, name, key):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start
    setattr(owner, name, wrapper)

timed(files, "sha256_file", "hash_s")
timed(files, "external_data_files", "graph_walk_s")
timed(files, "initializer_dims", "graph_walk_s")
timed(model_module, "load_tokenizer", "tokenizer_s")
timed(ort.InferenceSession, "__init__", "session_s")
begin = time.perf_counter()
model = edge_slm.load(spec["model"], threads=spec["threads"], cache=spec["cache"],
                      verify=spec["verify"])
load_s = time.perf_counter() - begin
begin = time.perf_counter()
next(iter(model.generate_tokens(spec["ids"], max_new_tokens=1, temperature=0.0)))
first_s = time.perf_counter() - begin
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"import_s": import_s, "load_s": load_s, "first_token_s": first_s,
                  "peak_rss_bytes": peak, "session": model.decoder.session_source, **spent}))
"""

GENAI_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
begin = time.perf_counter()
import numpy as np
import onnxruntime_genai as og
import_s = time.perf_counter() - begin
begin = time.perf_counter()
model = og.Model(spec["model"])
model_s = time.perf_counter() - begin
begin = time.perf_counter()
tokenizer = og.Tokenizer(model)
tokenizer_s = time.perf_counter() - begin
begin = time.perf_counter()
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(spec["ids"]) + 1, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.asarray(spec["ids"], dtype=np.int32))
generator.generate_next_token()
first_s = time.perf_counter() - begin
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"import_s": import_s, "load_s": model_s, "tokenizer_s": tokenizer_s,
                  "first_token_s": first_s, "peak_rss_bytes": peak}))
"""

GENAI_MODEL = "genai og.Model"
GENAI_BOTH = "genai og.Model + og.Tokenizer"


def engines(
    args: argparse.Namespace, cache_dir: Path
) -> dict[str, tuple[str, str, dict[str, Any], dict[str, str]]]:
    """Row name -> (python, child script, spec, environment)."""
    base = {"ids": prompt_ids(32), "threads": args.threads}
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_SLM_")}
    # imports from bytecode, as an installed package has it: an environment that sets
    # PYTHONDONTWRITEBYTECODE compiles edge_slm's sources in every process (~0.2 s);
    # the bytecode goes to the private folder, never into the tree
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir / "pycache")
    warm_env = dict(env, EDGE_SLM_CACHE_DIR=str(cache_dir))
    rows: dict[str, tuple[str, str, dict[str, Any], dict[str, str]]] = {}
    for index, bundle in enumerate(args.bundles):
        name = bundle.name.removeprefix("smollm2-")
        cold = dict(base, model=str(bundle), cache=False, verify=True)
        rows[f"{name} cold"] = (sys.executable, EDGE_CHILD, cold, env)
        if index == 0:
            rows[f"{name} cold, verify=False"] = (
                sys.executable, EDGE_CHILD, dict(cold, verify=False), env
            )  # fmt: skip
        warm = dict(base, model=str(bundle), cache=True, verify=True)
        rows[f"{name} warm (cache)"] = (sys.executable, EDGE_CHILD, warm, warm_env)
    if args.genai_python:
        rows[GENAI_MODEL] = (
            args.genai_python,
            GENAI_CHILD,
            dict(base, model=args.genai_model),
            env,
        )
    return rows


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _rounds(runs: list[float], ref: list[float]) -> str:
    """Median of the per-round ratios and each round's: ``1.08 (1.02, 1.08, 1.11)``."""
    if not ref:
        return "n/a"
    each = [a / b for a, b in zip(runs, ref, strict=True)]
    return f"{statistics.median(each):.2f} ({', '.join(f'{x:.2f}' for x in each)})"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: medians in ms, per-round ratios of load (and load + first token)
    to genai's model load and to genai's model + tokenizer load."""
    genai = results.get(GENAI_MODEL, [])
    g_model = [r["load_s"] for r in genai]
    g_both = [r["load_s"] + r["tokenizer_s"] for r in genai]
    g_first = [r["load_s"] + r["tokenizer_s"] + r["first_token_s"] for r in genai]
    lines = [
        "| engine | import ms | load ms | hash / tokenizer / graph walks / session ms | "
        "load + first token ms | load x genai model (rounds) | load x genai model + "
        "tokenizer (rounds) | load + first token x genai's (rounds) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = dict(results)
    if genai:  # genai's second row: model and tokenizer, the like-for-like load
        rows[GENAI_BOTH] = [dict(r, load_s=r["load_s"] + r["tokenizer_s"]) for r in genai]
    for name, runs in rows.items():
        load = [r["load_s"] for r in runs]
        first = [r["load_s"] + r["first_token_s"] for r in runs]
        parts = "n/a"
        if "session_s" in runs[0]:
            keys = ("hash_s", "tokenizer_s", "graph_walk_s", "session_s")
            parts = " / ".join(f"{1000 * _median(runs, k):.0f}" for k in keys)
        elif name == GENAI_BOTH:
            parts = f"tokenizer {1000 * _median(genai, 'tokenizer_s'):.0f}"
        lines.append(
            f"| {name} | {1000 * _median(runs, 'import_s'):.0f} | "
            f"{1000 * statistics.median(load):.0f} | {parts} | "
            f"{1000 * statistics.median(first):.0f} | {_rounds(load, g_model)} | "
            f"{_rounds(load, g_both)} | {_rounds(first, g_first)} | "
            f"{_median(runs, 'peak_rss_bytes') / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bundles", type=Path, nargs="+", default=list(BUNDLES))
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai")
    parser.add_argument("--raw-json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()
    args.bundles = [b.resolve() for b in args.bundles]
    # make bench's variants are built when missing (offline, from the GGUF)
    ensure_bundles(
        {n: v for n, v in VARIANTS.items() if v[0].resolve() in args.bundles}, False, False
    )
    args.genai_python = args.genai_model = None
    if not args.no_genai:
        genai = peers.genai_paths_or_report()
        if genai is None:
            return 1
        args.genai_python, args.genai_model = genai
    with tempfile.TemporaryDirectory(prefix="edge-slm-cold-") as folder:
        rows = engines(args, Path(folder))
        for name, (python, script, spec, env) in rows.items():
            if "cold" in name:  # writes the bytecode of the imports
                run_child(python, script, spec, env)
            if "warm" in name:  # build the entry, then record its files (2 s apart: a
                # file changed less than 2 s before it is hashed is not recorded)
                run_child(python, script, spec, env)
                time.sleep(2.5)
                run_child(python, script, spec, env)
        names = list(rows)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        print(f"start: {os.getloadavg()}", file=sys.stderr)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                python, script, spec, env = rows[name]
                results[name].append(run_child(python, script, spec, env))
            print(f"round {round_ + 1}/{args.rounds}: load average {os.getloadavg()}",
                  file=sys.stderr)  # fmt: skip
    sessions = {
        name: sorted({str(r.get("session")) for r in runs}) for name, runs in results.items()
    }
    print(table(results))
    print("session sources: " + "; ".join(f"{n}: {', '.join(s)}" for n, s in sessions.items()
                                         if s != ["None"]))  # fmt: skip
    print(f"{args.rounds} rounds, {args.threads} threads; uptime: "
          + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())  # fmt: skip
    if args.raw_json:
        args.raw_json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
