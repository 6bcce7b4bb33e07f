"""Decode speed of an exact GGUF bundle with its block offsets folded into the pre-packed
weights (edge_slm/engine/block_offsets.py) against the offset graph, interleaved.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_block_offsets.py [BUNDLE] [--rounds 5] [--threads 2]

Two prepared-session caches in a private temporary folder: ``folded`` (the default) and
``offsets`` (``EDGE_SLM_BLOCK_OFFSETS=0``: the entry keeps the bundle's offset nodes).
Both entries are built first; then each round starts one fresh process per variant, the
order alternating between rounds. A process loads the bundle from its cache, warms up,
and times greedy runs of SHORT and LONG new tokens from an empty KV cache after a
32-token prompt (end-of-text banned): decode tok/s = (LONG - SHORT) / (t(LONG) - t(SHORT)),
so the prompt and per-call costs cancel; and a PREFILL-token prompt + 1 token. Prints
one line per process, the medians, the per-round ratio folded / offsets (both processes
of a round saw about the same load: on a shared machine the ratios are the figure to
trust), whether both variants chose the same tokens, and the load average.

Then ``--pairs`` paired runs in one more fresh process that opens both entries: the
decode rate and process CPU time per token of each variant measured alternately (ABBA
order), so a burst of load from other jobs falls on both; prints the medians and the
median of the per-pair ratios (with ``--threads 1`` the CPU time is the work a token
takes, whatever the load; with 2 threads it also counts onnxruntime's spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / "bundles" / "smollm2-fused-gguf"
VARIANTS = ("folded", "offsets")

CHILD = r"""
import json, sys, time
import edge_slm
spec = json.loads(sys.argv[1])
begin = time.perf_counter()
model = edge_slm.load(spec["bundle"], threads=spec["threads"], cache=spec["cache"])
load_s = time.perf_counter() - begin
ban = {t: float("-inf") for t in model.manifest.special_tokens.eos_token_ids}
ids = list(range(100, 132))
def run(n, prompt):
    begin, tokens = time.perf_counter(), []
    for token in model.generate_tokens(prompt, max_new_tokens=n, temperature=0.0, logit_bias=ban):
        tokens.append(token.token_id)
    return time.perf_counter() - begin, tokens
run(spec["short"], ids)  # warm-up
t_short, short = run(spec["short"], ids)
t_long, long_ = run(spec["long"], ids)
t_prefill, _ = run(1, [100 + i % 1000 for i in range(spec["prefill"])])
print(json.dumps({"load_s": load_s, "session": model.decoder.session_source,
    "decode_tok_s": (len(long_) - len(short)) / (t_long - t_short),
    "prefill_s": t_prefill, "tokens": long_}))
"""


PAIRED = r"""
import json, os, sys, time
import edge_slm
spec = json.loads(sys.argv[1])
models = {}
for variant, cache in spec["caches"].items():
    os.environ["EDGE_SLM_BLOCK_OFFSETS"] = "1" if variant == "folded" else "0"  # in the key
    models[variant] = edge_slm.load(spec["bundle"], threads=spec["threads"], cache=cache)
    assert models[variant].decoder.session_source == "prepared-session cache hit"
ids = list(range(100, 132))
def rate(model):
    ban = {t: float("-inf") for t in model.manifest.special_tokens.eos_token_ids}
    wall, cpu = [], []
    for n in (spec["short"], spec["long"]):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        for _ in model.generate_tokens(ids, max_new_tokens=n, temperature=0.0, logit_bias=ban):
            pass
        wall.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
    tokens = spec["long"] - spec["short"]
    return {"tok_s": tokens / (wall[1] - wall[0]), "cpu_ms": 1e3 * (cpu[1] - cpu[0]) / tokens}
for model in models.values():
    rate(model)  # warm-up
pairs = []
for index in range(spec["pairs"]):
    order = list(models) if index % 2 == 0 else list(models)[::-1]
    pairs.append({variant: rate(models[variant]) for variant in order})
print(json.dumps(pairs))
"""


def paired(caches: Path, args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    spec = {
        "bundle": str(args.bundle),
        "threads": args.threads,
        "caches": {v: str(caches / v) for v in VARIANTS},
        "short": args.short_tokens,
        "long": args.new_tokens,
        "pairs": args.pairs,
    }
    out = subprocess.run(
        [sys.executable, "-c", PAIRED, json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"paired process failed:\n{out.stderr[-2000:]}")
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def child(variant: str, caches: Path, args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "EDGE_SLM_BLOCK_OFFSETS": "1" if variant == "folded" else "0"}
    spec = {
        "bundle": str(args.bundle),
        "threads": args.threads,
        "cache": str(caches / variant),
        "short": args.short_tokens,
        "long": args.new_tokens,
        "prefill": args.prefill_tokens,
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{variant} process failed:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=130)
    parser.add_argument("--short-tokens", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=10, help="paired runs (0: none)")
    args = parser.parse_args()
    print(f"load average at the start: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench-block-offsets-") as tmp:
        caches = Path(tmp)
        for variant in VARIANTS:  # build both entries (not timed)
            built = child(variant, caches, args)
            print(f"{variant}: {built['session']}")
        runs: dict[str, list[dict[str, object]]] = {v: [] for v in VARIANTS}
        for index in range(args.rounds):
            order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                result = child(variant, caches, args)
                runs[variant].append(result)
                print(
                    f"round {index + 1} {variant:8s} decode {result['decode_tok_s']:6.1f} tok/s"
                    f"  prefill {result['prefill_s']:.3f} s  load {result['load_s']:.3f} s"
                    f"  ({result['session']}; load average {load_average()})"
                )
        pairs = paired(caches, args) if args.pairs else []
    for key, unit in (("decode_tok_s", "tok/s"), ("prefill_s", "s"), ("load_s", "s")):
        medians = {v: statistics.median(float(r[key]) for r in runs[v]) for v in VARIANTS}  # type: ignore[arg-type]
        ratios = [
            float(f[key]) / float(o[key])  # type: ignore[arg-type]
            for f, o in zip(runs["folded"], runs["offsets"], strict=True)
        ]
        print(
            f"{key}: folded {medians['folded']:.3f} {unit}, offsets {medians['offsets']:.3f} {unit};"
            f" folded/offsets per round {', '.join(f'{r:.3f}' for r in ratios)}"
            f" (median {statistics.median(ratios):.3f})"
        )
    same = all(
        f["tokens"] == o["tokens"] for f, o in zip(runs["folded"], runs["offsets"], strict=True)
    )
    print(f"greedy tokens equal in every round: {same}")
    if pairs:
        for key, what in (("tok_s", "decode tok/s"), ("cpu_ms", "process CPU ms per token")):
            ratios = [p["folded"][key] / p["offsets"][key] for p in pairs]
            print(
                f"paired {what} ({len(pairs)} pairs, one process):"
                f" folded {statistics.median(p['folded'][key] for p in pairs):.2f},"
                f" offsets {statistics.median(p['offsets'][key] for p in pairs):.2f};"
                f" folded/offsets per pair {', '.join(f'{r:.2f}' for r in ratios)}"
                f" (median {statistics.median(ratios):.3f})"
            )
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
