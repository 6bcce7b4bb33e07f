"""k streams on one loaded model at once against the same k generations one after another.

Usage (from the repository root; ``make bench-concurrency`` runs it on the demo's bundle):

    .venv/bin/python benchmarks/bench_concurrency.py [BUNDLE] [--streams 1,2,4,8]
        [--rounds 3] [--new-tokens 64] [--threads 2] [--out docs/performance-concurrency.md]

For each k and round, two fresh processes (the order alternating round after round, so
that a busy machine slows both alike), each loading the bundle once
(``edge_slm.load(BUNDLE, threads=THREADS)``), warming it up on an unrelated prompt, then:

* ``sequential``: ``model.generate(prompt_i, max_new_tokens=N, temperature=0)`` for
  i = 1..k, one after another;
* ``concurrent``: the same k calls from k threads started together on the same model
  (the batched decode of the issue "One model, many conversations": sessions decoding
  at the same time share one forward per step).

The k prompts are distinct from their first token (no shared prefix to reuse) and of
equal token length; the end-of-text tokens are banned (``logit_bias``) so that every
answer is exactly N tokens. Aggregate tokens/s = all generated tokens / wall time
(prefill included, first call started to last call done). Greedy decoding makes every
concurrent answer checkable against its sequential twin of the same round: a mismatch
(or a crash) is reported in the table and on stderr instead of a number, and the script
exits 2. The markdown table (medians over rounds; the ratio is the median of per-round
concurrent / sequential ratios) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles/smollm2-135m-instruct-int4-small"  # int4-search, the fastest
MODES = ("sequential", "concurrent")
# distinct openings (one word each), then the same instruction: equal lengths are checked
TOPICS = (
    "Lighthouses", "Volcanoes", "Glaciers", "Submarines", "Orchards", "Comets",
    "Libraries", "Bridges", "Deserts", "Railways", "Beehives", "Castles",
)  # fmt: skip
TAIL = " are the subject of this long story. Tell it slowly, with many details and names."

CHILD = r"""
import json, sys, threading, time
import edge_slm
bundle, mode, k, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
prompts, banned = json.loads(sys.argv[6]), json.loads(sys.argv[7])
model = edge_slm.load(bundle, threads=threads)
bias = {int(t): -100.0 for t in banned}
model.generate("Hello there.", max_new_tokens=4, temperature=0)  # warm-up, unrelated prompt
results, errors = [[] for _ in range(k)], []
def one(i):
    try:
        r = model.generate(prompts[i], max_new_tokens=new, temperature=0, logit_bias=bias)
        results[i] = list(r.token_ids)
    except Exception as error:  # a thread's failure is the run's failure
        errors.append(f"stream {i}: {type(error).__name__}: {error}")
start = time.perf_counter()
if mode == "sequential":
    for i in range(k):
        one(i)
else:
    workers = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
wall = time.perf_counter() - start
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "token_ids": results, "peak_rss_bytes": peak, "errors": errors}))
sys.exit(3 if errors else 0)
"""


def make_prompts(bundle: Path, k: int) -> tuple[list[str], int, list[int]]:
    """``k`` prompts of equal token length, distinct from the first token; that length;
    the end-of-text ids to ban."""
    from tokenizers import Tokenizer

    from edge_slm.bundle import read_manifest

    manifest, _ = read_manifest(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / manifest.files["tokenizer"]))
    lengths: dict[int, list[str]] = {}
    for topic in TOPICS:
        text = topic + TAIL
        lengths.setdefault(len(tokenizer.encode(text).ids), []).append(text)
    best = max(lengths.values(), key=len)
    if len(best) < k:
        raise SystemExit(f"only {len(best)} prompts of equal length; k={k} needs more TOPICS")
    banned = sorted(set(manifest.special_tokens.eos_token_ids))
    return best[:k], len(tokenizer.encode(best[0]).ids), banned


@dataclass
class Measured:
    """One process's run: wall time and every stream's token ids, or why it failed."""

    wall_s: float = 0.0
    token_ids: list[list[int]] = field(default_factory=list)
    peak_rss_bytes: int = 0
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return sum(len(ids) for ids in self.token_ids) / self.wall_s


def measure(
    bundle: Path, mode: str, k: int, args: argparse.Namespace, prompts: list[str], banned: list[int]
) -> Measured:
    """One fresh process; its result, or its error if it failed or crashed."""
    command = [
        sys.executable, "-c", CHILD, str(bundle), mode, str(k), str(args.new_tokens),
        str(args.threads), json.dumps(prompts[:k]), json.dumps(banned),
    ]  # fmt: skip
    env = {kv: v for kv, v in os.environ.items() if kv != "PYTHONPATH"}
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0:
        reported = json.loads(lines[-1]).get("errors") if lines and out.returncode == 3 else None
        tail = "; ".join(reported or out.stderr.strip().splitlines()[-3:])
        return Measured(error=f"exit {out.returncode}: {tail[-300:]}")
    result = json.loads(lines[-1])
    return Measured(result["wall_s"], result["token_ids"], result["peak_rss_bytes"])


def check(run: Measured, new: int) -> str | None:
    """Why ``run`` does not count: an error, or a stream not ``new`` tokens long."""
    if run.error:
        return run.error
    for i, ids in enumerate(run.token_ids):
        if len(ids) != new:
            return f"stream {i}: {len(ids)} tokens, not {new}"
    return None


def compare(seq: Measured, conc: Measured, new: int) -> str | None:
    """Why the concurrent run does not count (None when it matches its sequential twin)."""
    for name, run in (("sequential", seq), ("concurrent", conc)):
        if (problem := check(run, new)) is not None:
            return f"{name} run: {problem}"
    for i, (a, b) in enumerate(zip(seq.token_ids, conc.token_ids, strict=True)):
        if a != b:
            at = next(j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            return f"stream {i} differs from its sequential twin from token {at} on"
    return None


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=BUNDLE)
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 4, 8]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--modes",
        default="sequential,concurrent",
        help="comma-separated: sequential, concurrent (default both; the table needs both)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs/performance-concurrency.md")
    parser.add_argument("--raw-json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES) or not modes:
        parser.error(f"--modes takes {', '.join(MODES)}")
    bundle = args.bundle.resolve()
    if not (bundle / "manifest.json").is_file():
        parser.error(f"no bundle at {bundle}: run `make demo` first")
    prompts, prompt_tokens, banned = make_prompts(bundle, max(args.streams))
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, int], list[Measured]] = {}
    for round_ in range(args.rounds):
        for k in args.streams:
            order = modes if round_ % 2 == 0 else modes[::-1]
            for mode in order:
                result = measure(bundle, mode, k, args, prompts, banned)
                runs.setdefault((mode, k), []).append(result)
                shown = result.error or f"{result.tokens_per_s:.1f} tok/s"
                print(f"round {round_ + 1} k={k} {mode}: {shown}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    lines = [
        "| streams | sequential tok/s | concurrent tok/s | concurrent / sequential (rounds) "
        "| answers |",
        "|---:|---:|---:|---|---|",
    ]
    failed = False
    for k in args.streams:
        seqs = runs.get(("sequential", k), [])
        concs = runs.get(("concurrent", k), [])
        ok_seq = [r.tokens_per_s for r in seqs if check(r, args.new_tokens) is None]
        seq_cell = f"{_median(ok_seq):.1f}" if ok_seq else "failed"
        if not concs:
            conc_cell, ratio_cell, verdict = "-", "-", "sequential only"
            bad = [p for r in seqs if (p := check(r, args.new_tokens)) is not None]
            if bad:
                failed = True
                verdict = f"**{len(bad)} sequential run(s) failed**: {bad[0]}"
                print(f"FAILED k={k} sequential: " + "; ".join(bad), file=sys.stderr)
        elif not seqs:
            bad = [p for r in concs if (p := check(r, args.new_tokens)) is not None]
            failed = failed or bool(bad)
            conc_cell = "**failed**" if bad else f"{_median([r.tokens_per_s for r in concs]):.1f}"
            ratio_cell = "-"
            verdict = f"**failed**: {bad[0]}" if bad else "not checked (no sequential runs)"
        elif problems := [
            p for s, c in zip(seqs, concs, strict=True) if (p := compare(s, c, args.new_tokens))
        ]:
            failed = True
            conc_cell, ratio_cell = "**not counted**", "-"
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            verdict = f"**MISMATCH**: {problems[0]}{more}"
            print(f"MISMATCH k={k}: " + "; ".join(problems), file=sys.stderr)
        else:
            ratios = [c.tokens_per_s / s.tokens_per_s for s, c in zip(seqs, concs, strict=True)]
            conc_cell = f"{_median([r.tokens_per_s for r in concs]):.1f}"
            each = ", ".join(f"{x:.2f}" for x in ratios)
            ratio_cell = f"{_median(ratios):.2f} ({each})"
            verdict = "equal to the sequential ones"
        lines.append(f"| {k} | {seq_cell} | {conc_cell} | {ratio_cell} | {verdict} |")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rel = bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle
    notes = (
        f"Measured {when} on {platform.machine()}, {os.cpu_count()} CPUs; bundle `{rel}`, "
        f"{args.threads} threads, {prompt_tokens}-token prompts, {args.new_tokens} "
        f"greedy tokens per stream (end-of-text banned), {args.rounds} round(s) of fresh "
        f"processes, modes interleaved; load average (1 min) {load_before:.1f} before, "
        f"{load_after:.1f} after. Tokens/s = all streams' generated tokens / wall time, "
        "prefill included."
    )
    table = "\n".join(lines) + "\n\n" + notes + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# k streams on one model: concurrent against one after another\n\n"
        "Written by `benchmarks/bench_concurrency.py` (`make bench-concurrency`).\n\n" + table
    )
    if args.raw_json:
        raw = {f"{mode} k={k}": [asdict(r) for r in v] for (mode, k), v in runs.items()}
        args.raw_json.write_text(json.dumps(raw, indent=1))
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
