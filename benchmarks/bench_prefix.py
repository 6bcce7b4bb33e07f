"""Time to first token with and without prefix reuse (a kiosk's long fixed system prompt).

Runs the same chat turn on one bundle three ways, interleaved over several rounds:
``fresh`` (cache cleared: the whole prompt is computed), ``reused`` (the previous call
left the system prompt in the KV cache) and ``loaded`` (a prefix cache saved to disk
and loaded, as at a kiosk's start-up). Prints medians and the ratio to ``fresh``.

    python benchmarks/bench_prefix.py bundles/smollm2-135m-instruct-int8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import edge_slm

SYSTEM = (
    "You are the help desk of the central railway station. You answer travellers' "
    "questions about platforms, tickets, left luggage, toilets, taxis, buses, lost "
    "property, accessibility and opening hours. Platforms 1 to 6 are in the main hall; "
    "platforms 7 to 12 are reached through the underpass. Tickets are sold at the "
    "machines by the entrance and at the counter, open from 6 am to 10 pm. Left luggage "
    "is next to platform 1. Toilets are beside the cafe. Taxis wait outside the north "
    "exit; buses leave from the south exit. Answer in one or two short sentences, "
    "politely, and never invent a departure time. "
) * 2
QUESTIONS = ["Where are the toilets?", "Where do buses leave from?", "Where is platform 9?"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    model = edge_slm.load(args.bundle, threads=args.threads)
    system_messages = [{"role": "system", "content": SYSTEM}]
    times: dict[str, list[float]] = {"fresh": [], "reused": [], "loaded": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache_file = model.save_prefix_cache(Path(tmp) / "system.npz", system_messages)
        for round_ in range(args.rounds):
            question = QUESTIONS[round_ % len(QUESTIONS)]
            messages = [*system_messages, {"role": "user", "content": question}]
            outputs = {}
            for mode in ("fresh", "loaded", "reused"):
                model.reset_cache()  # no loaded prefix cache
                if mode == "loaded":
                    model.load_prefix_cache(cache_file)
                with model.conversation() as conversation:
                    if mode == "reused":  # an earlier turn of this conversation holds the prefix
                        conversation.chat(
                            [*system_messages, {"role": "user", "content": "Hello"}],
                            max_new_tokens=1,
                        )
                    result = conversation.chat(messages, max_new_tokens=8, temperature=0.0)
                times[mode].append(result.timings.time_to_first_token_s)
                outputs[mode] = result.token_ids
            assert outputs["fresh"] == outputs["reused"] == outputs["loaded"], outputs
    prompt_tokens = len(model.encode(model.render_chat(messages), add_special_tokens=False))
    print(f"bundle: {args.bundle}  prompt: {prompt_tokens} tokens, {args.rounds} rounds")
    base = statistics.median(times["fresh"])
    print(f"{'mode':<8} {'TTFT median s':>14} {'x fresh':>8}")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:<8} {median:>14.3f} {median / base:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
