"""Prompt-lookup speculative decoding against plain decoding, on kiosk-style questions.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_speculative.py [BUNDLE] [--rounds 5] [--threads 2]
        [--tokens 4] [--ngram 3] [--quick]

Each task is a chat request answered greedily by SmolLM2-135M-Instruct (default bundle
``bundles/smollm2-135m-instruct-int4``): three extractive ones (answer or summarise from
a kiosk FAQ passage given in the prompt) and one control that quotes nothing (a poem).
Every round runs plain decoding and ``speculative="prompt-lookup"`` in two fresh
processes (their order alternating between rounds, so a busy machine slows both alike);
each process loads the bundle, warms up, then answers every task once. The table gives
medians over the rounds of decode tokens/s (tokens after the first per second after the
first token) and of the per-round ratio speculative / plain, the share of drafted tokens
kept, and whether the tokens were identical to plain decoding in every round.
``uptime``'s load average is printed with every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "bundles/smollm2-135m-instruct-int4"
PASSAGE = (
    "Welcome to the City Museum. Opening hours: the museum is open from 9 am to 6 pm, "
    "Tuesday to Sunday, and closed on Mondays. Tickets cost 12 euros for adults, 8 euros "
    "for students and are free for children under 12. The cafe on the ground floor serves "
    "coffee, sandwiches and cakes until 5 pm. Lockers for bags are next to the entrance "
    "and need a 1 euro coin, which is returned. Guided tours in English start at 11 am and "
    "3 pm at the information desk and last one hour."
)
TASKS = {
    "answer: tickets and hours": f"{PASSAGE}\n\nUsing only the text above: how much do "
    "tickets cost, and when is the museum open?",
    "answer: tours and lockers": f"{PASSAGE}\n\nUsing only the text above: when do the "
    "guided tours start, and how do the lockers work?",
    "summarise the passage": f"{PASSAGE}\n\nSummarise the text above for a visitor.",
    "control: a poem (nothing to quote)": "Write a short poem about the sea.",
}


def child(args: argparse.Namespace) -> None:
    """One process: load, warm up, answer every task once; print a JSON line."""
    import edge_slm

    model = edge_slm.load(args.bundle, threads=args.threads)
    backend: Any = model.backend  # type: ignore[union-attr]
    counts = {"verified": 0, "dropped": 0}
    extend, truncate = backend.extend, backend.truncate

    def counted_extend(state: Any, ids: Any, all_positions: bool = False) -> Any:
        if all_positions:
            counts["verified"] += len(ids) - 1
        return extend(state, ids, all_positions)

    def counted_truncate(state: Any, length: int) -> None:
        counts["dropped"] += max(0, len(state.tokens) - length)
        truncate(state, length)

    backend.extend, backend.truncate = counted_extend, counted_truncate
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    if args.mode != "plain":
        options.update(
            speculative=args.mode, speculative_tokens=args.tokens, speculative_ngram=args.ngram
        )
    model.chat([{"role": "user", "content": "Hi"}], **{**options, "max_new_tokens": 8})  # type: ignore[union-attr]
    out = {}
    for name, prompt in TASKS.items():
        counts.update(verified=0, dropped=0)
        begin = time.perf_counter()
        result = model.chat([{"role": "user", "content": prompt}], **options)  # type: ignore[union-attr]
        out[name] = {
            "tokens": result.token_ids,
            "seconds": time.perf_counter() - begin,
            "decode_tokens_per_s": result.timings.decode_tokens_per_s,
            "verified": counts["verified"],
            "kept": counts["verified"] - counts["dropped"],
        }
    print(json.dumps(out))


def run_child(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    command = [
        sys.executable, __file__, str(args.bundle), "--child", "--mode", mode,
        "--threads", str(args.threads), "--tokens", str(args.tokens), "--ngram", str(args.ngram),
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def uptime() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4, help="speculative_tokens (k)")
    parser.add_argument("--ngram", type=int, default=3, help="speculative_ngram (n)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 48 tokens (smoke)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if args.quick:
        args.rounds, args.max_new_tokens = 2, 48
    modes = ("plain", "prompt-lookup")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    loads = [uptime()]
    print(f"start: {loads[0]}", file=sys.stderr)
    for round_ in range(args.rounds):
        order = modes if round_ % 2 == 0 else modes[::-1]
        for mode in order:
            runs[mode].append(run_child(args, mode))
        loads.append(uptime())
        print(f"round {round_ + 1}/{args.rounds}: {loads[-1]}", file=sys.stderr)
    lines = [
        f"{args.bundle.name}, greedy, at most {args.max_new_tokens} tokens, "
        f"{args.threads} threads, k={args.tokens}, n={args.ngram}, {args.rounds} rounds; "
        f"{loads[0]} at the start, {loads[-1]} at the end",
        "",
        "| task | tokens | plain tok/s | prompt-lookup tok/s | speed-up (rounds) "
        "| drafts kept | tokens identical |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for name in TASKS:
        plain = [r[name] for r in runs["plain"]]
        fast = [r[name] for r in runs["prompt-lookup"]]
        ratios = [
            f["decode_tokens_per_s"] / p["decode_tokens_per_s"]
            for p, f in zip(plain, fast, strict=True)
        ]
        verified = sum(f["verified"] for f in fast)
        kept = sum(f["kept"] for f in fast) / verified if verified else float("nan")
        identical = all(f["tokens"] == p["tokens"] for f in fast for p in plain)
        cells = [
            name,
            str(len(plain[0]["tokens"])),
            f"{statistics.median(p['decode_tokens_per_s'] for p in plain):.1f}",
            f"{statistics.median(f['decode_tokens_per_s'] for f in fast):.1f}",
            f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})",
            f"{100 * kept:.0f}%",
            "yes" if identical else "**no**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
