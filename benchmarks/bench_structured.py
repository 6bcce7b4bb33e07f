"""Constrained decoding cost on a real bundle (docs/structured-output.md).

Measures, with llguidance: building the LLTokenizer from tokenizer.json, compiling a
schema (matcher + first mask), the per-token mask (fill the bitmask + apply it to the
logits), and decode tokens/s of the same chat with and without a JSON schema.

    python benchmarks/bench_structured.py bundles/smollm2-135m-instruct-int4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

import edge_slm
from edge_slm.generation import constraints

BOOKING = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "guests": {"type": "integer", "minimum": 1, "maximum": 20},
        "date": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
        "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
    },
    "required": ["name", "guests", "date", "time"],
    "additionalProperties": False,
}
INTENT = {
    "type": "object",
    "properties": {"intent": {"enum": ["book", "cancel", "opening_hours", "directions", "other"]}},
    "required": ["intent"],
    "additionalProperties": False,
}
MESSAGES = [
    {
        "role": "user",
        "content": "Extract the booking as JSON: Ana Lopez, 4 people, 12 March 2026 at 19:30.",
    }
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = edge_slm.load(args.bundle)
    import llguidance

    start = time.perf_counter()
    tokenizer = constraints.ll_tokenizer(model)
    out: dict[str, Any] = {
        "llguidance": llguidance.__version__,
        "vocab": model.manifest.vocab_size,
        "tokenizer_build_s": time.perf_counter() - start,
    }
    for name, schema in (("booking", BOOKING), ("intent", INTENT)):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            compiled = constraints.compile_constraint(edge_slm.JsonSchema(schema), model)
            state = compiled.start()
            state.allowed(model.manifest.vocab_size, ())
            times.append(time.perf_counter() - start)
        out[f"compile_{name}_ms"] = 1e3 * statistics.median(times)
    assert tokenizer is constraints.ll_tokenizer(model)

    # Per-token mask: wrap ConstraintState.mask during constrained greedy chats.
    mask_times: list[float] = []
    original = constraints.ConstraintState.mask

    def timed(self: Any, logits: np.ndarray, stop_ids: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return original(self, logits, stop_ids)
        finally:
            mask_times.append(time.perf_counter() - start)

    constraints.ConstraintState.mask = timed  # type: ignore[method-assign]
    rates: dict[str, list[float]] = {"free": [], "schema": []}
    texts = {}
    for _ in range(args.repeat):
        for kind in ("free", "schema"):
            constraint = edge_slm.JsonSchema(BOOKING) if kind == "schema" else None
            result = model.chat(MESSAGES, temperature=0, max_new_tokens=48, constraint=constraint)
            rates[kind].append(result.timings.decode_tokens_per_s)
            texts[kind] = (result.text, str(result.finish_reason), len(result.token_ids))
    constraints.ConstraintState.mask = original  # type: ignore[method-assign]
    out["mask_us_median"] = 1e6 * statistics.median(mask_times)
    out["mask_us_p95"] = 1e6 * float(np.percentile(mask_times, 95))
    out["decode_tok_s_free"] = statistics.median(rates["free"])
    out["decode_tok_s_schema"] = statistics.median(rates["schema"])
    out["texts"] = texts
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
