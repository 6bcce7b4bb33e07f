"""Perplexity of llama.cpp on a GGUF file over given token-id windows (run with the
llama-cpp-python venv of benchmarks/peers.py, not the project's).

Usage:

    .cache/peers/llama-venv/bin/python benchmarks/llama_cpp_perplexity.py MODEL.gguf WINDOWS.json

``WINDOWS.json`` is a list of token-id lists (BOS already in front when the model wants
one), the very windows our own perplexity scores, so both engines see the same ids.
Each window is evaluated from an empty context with ``logits_all``; token ``t + 1`` is
scored with the log-softmax of position ``t``. Prints JSON: perplexity, tokens, windows.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
from llama_cpp import Llama


def main() -> int:
    model_path, windows_path = sys.argv[1], sys.argv[2]
    with open(windows_path, encoding="utf-8") as f:
        windows: list[list[int]] = json.load(f)
    longest = max(len(w) for w in windows)
    llm = Llama(
        model_path=model_path,
        n_ctx=longest,
        n_batch=longest,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )
    nll, predicted = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        targets = np.asarray(ids[1:])
        nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        predicted += len(targets)
    result = {"perplexity": math.exp(nll / predicted), "tokens": predicted, "windows": len(windows)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
