"""Zero-shot sentiment with the 135M generator against a head trained on the device.

The same held-out Pang & Lee sentences the demo's ``bundles/sentiment-int8`` never saw
(its 20% stratified split, seed 0; the first ``-n`` of them, both labels evenly) are
labelled:

* by SmolLM2-135M-Instruct bundles with ``choose()``: the labels become the options
  after a chat prompt that names them (``PROMPT``); the option with the higher
  probability wins. "calibrated" divides each label's probability by its probability
  for a content-free review ("N/A"), which removes the model's preference for one word
  (contextual calibration, Zhao et al. 2021);
* by the trained classifier bundle(s), one text per call.

Accuracy and texts per second (one text at a time, 2 threads) are printed as a
Markdown table.

    python benchmarks/bench_zero_shot.py -n 300 \\
        --generators bundles/smollm2-135m-instruct bundles/smollm2-135m-instruct-int8 \\
        --classifiers bundles/sentiment-int8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from fetch_assets import polarity_examples

import edge_slm
from edge_slm.encoders.train_head import stratified_split

LABELS = ("negative", "positive")
PROMPT = (
    "Is the sentiment of this movie review negative or positive? Answer with one word.\n\n"
    "Review: {text}"
)


def test_sentences(assets: Path, n: int) -> list[tuple[str, str]]:
    """``n`` held-out sentences (the split of train_classifier's defaults), labels even."""
    rows = polarity_examples(assets)
    _, held = stratified_split([label for _, label in rows], 0.2, seed=0)
    by_label = {label: [rows[i] for i in held if rows[i][1] == label] for label in LABELS}
    half = n // 2
    return [row for pair in zip(by_label["negative"][:half], by_label["positive"][:half], strict=True) for row in pair]  # fmt: skip


def zero_shot(bundle: Path, rows: list[tuple[str, str]]) -> list[dict[str, object]]:
    """Raw and calibrated zero-shot accuracy of one generator bundle, and its speed."""
    model = edge_slm.load(bundle)

    def probabilities(text: str) -> np.ndarray:
        messages = [{"role": "user", "content": PROMPT.format(text=text)}]
        prompt = model.render_chat(messages, add_generation_prompt=True)
        scores = dict(model.choose(prompt, list(LABELS)))
        return np.array([scores[label] for label in LABELS])

    prior = probabilities("N/A")
    probabilities(rows[0][0])  # warm-up
    start = time.perf_counter()
    raw = [probabilities(text) for text, _ in rows]
    seconds = time.perf_counter() - start
    truth = np.array([LABELS.index(label) for _, label in rows])
    out = []
    for name, probs in (("", raw), (" calibrated", [p / prior for p in raw])):
        guess = np.array([int(np.argmax(p)) for p in probs])
        out.append({
            "engine": f"{bundle.name} choose(){name}",
            "accuracy": float(np.mean(guess == truth)),
            "positive_share": float(np.mean(guess == 1)),
            "texts_per_s": len(rows) / seconds,
        })  # fmt: skip
    return out


def trained(bundle: Path, rows: list[tuple[str, str]]) -> dict[str, object]:
    """Accuracy and speed (one text per call) of a classifier bundle."""
    clf = edge_slm.load(bundle)
    clf.classify(rows[0][0])  # warm-up
    start = time.perf_counter()
    labels = [clf.classify(text).label for text, _ in rows]
    seconds = time.perf_counter() - start
    return {
        "engine": f"{bundle.name} (trained head)",
        "accuracy": float(np.mean([got == want for got, (_, want) in zip(labels, rows, strict=True)])),
        "positive_share": float(np.mean([label == "positive" for label in labels])),
        "texts_per_s": len(rows) / seconds,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="held-out sentences (even)")
    parser.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    parser.add_argument(
        "--generators", type=Path, nargs="+", default=[Path("bundles/smollm2-135m-instruct-int8")]
    )
    parser.add_argument(
        "--classifiers", type=Path, nargs="+", default=[Path("bundles/sentiment-int8")]
    )
    args = parser.parse_args()
    rows = test_sentences(args.assets, args.n)
    results = [trained(b, rows) for b in args.classifiers]
    for bundle in args.generators:
        results += zero_shot(bundle, rows)
        print(results[-2:], file=sys.stderr)
    print(f"\n{len(rows)} held-out Pang & Lee sentences ({len(rows) // 2} per label)\n")
    print("| engine | accuracy | predicted positive | texts/s (one at a time) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {100 * r['accuracy']:.1f}% | {100 * r['positive_share']:.0f}% "
              f"| {r['texts_per_s']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
