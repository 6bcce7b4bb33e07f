"""Run in a subprocess by tests/test_concurrency.py: one loaded model, many threads.

Usage: ``python concurrency_worker.py generate BUNDLE [--threads N] [--rounds R]`` or
``python concurrency_worker.py encoders CLASSIFIER EMBEDDER [--threads N]``.

Every result of the threaded run must equal the same call run alone, one after the
other, on the same model. Exits 0 when all match; prints each mismatch and exits 1.
A crash (heap corruption, an onnxruntime error) shows as another exit status.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import Any

import edge_slm

SYSTEM = "You are a kiosk assistant at the central station. Answer briefly. "
QUESTIONS = [
    "Where is platform 4?",
    "Where are the toilets?",
    "When does the last train leave?",
    "Can I buy a ticket here?",
    "Is there a taxi rank?",
    "Where can I find a lift?",
]


def generation_jobs(model: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Named calls whose results must not depend on what runs beside them."""
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for i, question in enumerate(QUESTIONS):
        prompt = SYSTEM + question  # prompts share a long prefix
        jobs.append(
            (
                f"greedy {i}",
                lambda p=prompt: model.generate(p, max_new_tokens=12, temperature=0.0).token_ids,
            )
        )
        jobs.append(
            (
                f"seeded {i}",
                lambda p=prompt, s=i: (
                    model.generate(
                        p, max_new_tokens=12, temperature=0.9, top_k=20, seed=s
                    ).token_ids
                ),
            )
        )
        jobs.append(
            (
                f"stream {i}",
                lambda p=prompt: [
                    t
                    for c in model.stream(p, max_new_tokens=10, temperature=0.0)
                    for t in c.token_ids
                ],
            )
        )

        def two_turns(q: str = question) -> list[int]:
            with model.conversation() as conversation:
                messages = [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": q},
                ]
                first = conversation.chat(messages, max_new_tokens=6, temperature=0.0)
                messages += [
                    {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And then?"},
                ]
                second = conversation.chat(messages, max_new_tokens=6, temperature=0.0)
                return [*first.token_ids, -1, *second.token_ids]

        jobs.append((f"conversation {i}", two_turns))
    return jobs


def encoder_jobs(classifier: Any, embedder: Any) -> list[tuple[str, Callable[[], Any]]]:
    texts = [SYSTEM + q for q in QUESTIONS] + QUESTIONS
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for i, text in enumerate(texts):
        jobs.append(
            (
                f"classify {i}",
                lambda t=text: [(c.labels, c.scores) for c in classifier.classify([t, t[:20]])],
            )
        )
        jobs.append((f"embed {i}", lambda t=text: next(iter(embedder.embed([t]))).tolist()))
    return jobs


def run_threads(
    jobs: list[tuple[str, Callable[[], Any]]], threads: int, rounds: int
) -> dict[str, list[Any]]:
    """Each thread runs every job ``rounds`` times, each thread in its own order."""
    results: dict[str, list[Any]] = {name: [] for name, _ in jobs}
    errors: list[str] = []
    lock = threading.Lock()

    def work(offset: int) -> None:
        order = jobs[offset:] + jobs[:offset]
        for _ in range(rounds):
            for name, call in order:
                try:
                    value = call()
                except Exception as exc:  # reported, then the run fails
                    with lock:
                        errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    results[name].append(value)

    workers = [threading.Thread(target=work, args=(i * 3,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        print("\n".join(errors))
        sys.exit(2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["generate", "encoders"])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "generate":
        model = edge_slm.load(args.bundles[0], options=edge_slm.LoadOptions(max_sessions=16))
        jobs = generation_jobs(model)
    else:
        jobs = encoder_jobs(edge_slm.load(args.bundles[0]), edge_slm.load(args.bundles[1]))
    expected = {name: call() for name, call in jobs}  # one after the other
    before = model.capacity() if args.mode == "generate" else None
    got = run_threads(jobs, args.threads, args.rounds)
    bad = [
        f"{name}: expected {expected[name]!r}, got {value!r}"
        for name, values in got.items()
        for value in values
        if value != expected[name]
    ]
    counted = sum(len(v) for v in got.values())
    if counted != len(jobs) * args.threads * args.rounds:
        bad.append(f"{counted} results, expected {len(jobs) * args.threads * args.rounds}")
    if args.mode == "generate":
        capacity = model.capacity()
        assert before is not None
        print(
            f"threaded run: batches={capacity.batches - before.batches}, "
            f"batched_steps={capacity.batched_steps - before.batched_steps}"
        )
        if capacity.live_sessions != 0:
            bad.append(f"{capacity.live_sessions} conversations still hold KV memory")
    print("\n".join(bad) if bad else f"ok: {counted} results equal the sequential run")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
