"""Head training on the device: accuracy against scikit-learn, time, and few-shot curves.

Embeds Pang & Lee polarity (4,000 sentences) and BBC News (2,225 articles, 5 topics)
with MiniLM bundles (fp32 and dynamic int8, as ``make demo`` builds them), then on the
same vectors and the same stratified split (20% held out, seed 0):

* held-out accuracy and fitting time of edge_slm's NumPy head against scikit-learn's
  ``LogisticRegression`` (lbfgs), for several C;
* C chosen on a validation part of the training split (never on the held-out split);
* few-shot: 2-64 training examples per label drawn from the training split, 10 seeds,
  accuracy on the whole held-out split (mean and standard deviation), with C=1
  (scikit-learn's default) and C=100, plotted to ``docs/few-shot.png``.

Embeddings are cached in ``.cache/bench-train/`` (keyed by the bundle's graph sha256).

    python benchmarks/bench_train_head.py --bundles bundles/minilm
    python benchmarks/bench_train_head.py --bundles bundles/minilm-int8 --datasets polarity \
        --no-few-shot --json .cache/bench-train/results-int8.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from fetch_assets import bbc_news_examples, polarity_examples

from edge_slm.bundle import read_bundle, sha256_file
from edge_slm.encoders.embed import TextEmbedder
from edge_slm.encoders.logistic import fit_logistic
from edge_slm.encoders.train_head import stratified_split

DATASETS = {"polarity": polarity_examples, "bbc": bbc_news_examples}
SHOTS = (2, 4, 8, 16, 32, 64)
SEEDS = 10
CS = (0.1, 1.0, 10.0, 100.0)
FEW_SHOT_CS = (1.0, 100.0)  # scikit-learn's default, and a weak regularisation


def embeddings(bundle: Path, dataset: str, assets: Path, cache: Path) -> tuple[np.ndarray, float]:
    """Vectors of ``dataset`` by ``bundle`` and the seconds embedding took (cached)."""
    manifest = read_bundle(bundle)
    key = sha256_file(bundle / manifest.files["model"])[:16]
    npy, meta = cache / f"{dataset}-{key}.npy", cache / f"{dataset}-{key}.json"
    if npy.is_file() and meta.is_file():
        return np.load(npy), float(json.loads(meta.read_text())["seconds"])
    texts = [text for text, _ in DATASETS[dataset](assets)]
    embedder = TextEmbedder(bundle, manifest)
    start, cpu = time.perf_counter(), time.process_time()
    vectors = embedder.embed_all(texts, truncation="silent")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    cache.mkdir(parents=True, exist_ok=True)
    np.save(npy, vectors)
    meta.write_text(
        json.dumps({"seconds": seconds, "cpu_s": cpu, "texts": len(texts), "bundle": str(bundle)})
    )
    print(f"embedded {dataset} with {bundle}: {seconds:.1f} s", file=sys.stderr)
    return vectors, seconds


def accuracy(head_predictions: list[str], truth: list[str]) -> float:
    return float(np.mean(np.array(head_predictions) == np.array(truth)))


def parity(x: np.ndarray, y: list[str], train: list[int], held: list[int]) -> list[dict]:
    """Our head and scikit-learn's on the same split, per C: accuracy and fit time."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = x[train], [y[i] for i in train]
    x_held, y_held = x[held], [y[i] for i in held]
    rows = []
    for C in CS:
        start, cpu = time.perf_counter(), time.process_time()
        head = fit_logistic(x_train, y_train, C=C)
        ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        sk = LogisticRegression(C=C, max_iter=1000).fit(x_train, y_train)
        sk_s, sk_cpu = time.perf_counter() - start, time.process_time() - cpu
        rows.append({
            "C": C,
            "ours": accuracy(head.predict(x_held), y_held),
            "sklearn": float(sk.score(x_held, y_held)),
            "ours_s": ours_s,
            "ours_cpu_s": ours_cpu,
            "sklearn_s": sk_s,
            "sklearn_cpu_s": sk_cpu,
            "iterations": head.iterations,
            "max_prob_diff": float(np.abs(head.probabilities(x_held) - sk.predict_proba(x_held)).max()),
        })  # fmt: skip
    return rows


def choose_c(x: np.ndarray, y: list[str], train: list[int]) -> dict[float, float]:
    """Accuracy per C on a validation quarter of the training split (seed 1)."""
    labels = [y[i] for i in train]
    inner, valid = stratified_split(labels, 0.25, seed=1)
    fit_rows, valid_rows = [train[i] for i in inner], [train[i] for i in valid]
    result = {}
    for C in CS:
        head = fit_logistic(x[fit_rows], [y[i] for i in fit_rows], C=C)
        result[C] = accuracy(head.predict(x[valid_rows]), [y[i] for i in valid_rows])
    return result


def few_shot(
    x: np.ndarray, y: list[str], train: list[int], held: list[int], C: float
) -> dict[int, tuple[float, float]]:
    """Accuracy (mean, sd over SEEDS draws) with n training examples per label."""
    by_label: dict[str, list[int]] = {}
    for i in train:
        by_label.setdefault(y[i], []).append(i)
    y_held = [y[i] for i in held]
    curve = {}
    for n in SHOTS:
        scores = []
        for seed in range(SEEDS):
            rng = np.random.default_rng(seed)
            rows = [
                int(i)
                for label in sorted(by_label)
                for i in rng.choice(by_label[label], n, replace=False)
            ]
            head = fit_logistic(x[rows], [y[i] for i in rows], C=C)
            scores.append(accuracy(head.predict(x[held]), y_held))
        curve[n] = (float(np.mean(scores)), float(np.std(scores)))
    return curve


def plot(
    curves: dict[str, dict[int, tuple[float, float]]], full: dict[str, float], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"polarity": "tab:blue", "bbc": "tab:orange"}
    for name, curve in curves.items():
        color = colors[name.split()[0]]
        style = "-" if name.endswith("C=1") else "--"
        shots = sorted(curve)
        mean = np.array([curve[n][0] for n in shots]) * 100
        sd = np.array([curve[n][1] for n in shots]) * 100
        ax.errorbar(shots, mean, yerr=sd, marker="o", capsize=3, color=color, linestyle=style,
                    label=name)  # fmt: skip
        ax.axhline(full[name] * 100, color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SHOTS, [str(n) for n in SHOTS])
    ax.set_xlabel("training examples per label")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MiniLM + NumPy logistic-regression head (10 draws, mean ± sd)\n"
                 "dotted: all training examples (C=1 and C=100)", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, nargs="+", default=[Path("bundles/minilm")])
    parser.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench-train"))
    parser.add_argument("--plot", type=Path, default=Path("docs/few-shot.png"))
    parser.add_argument("--json", type=Path, default=Path(".cache/bench-train/results.json"))
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument(
        "--few-shot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the few-shot curve and its plot (on the first bundle)",
    )
    args = parser.parse_args()
    results: dict = {"bundles": {}}
    curves, full = {}, {}
    for b, bundle in enumerate(args.bundles):
        per_bundle = results["bundles"][str(bundle)] = {}
        for dataset in args.datasets:
            reader = DATASETS[dataset]
            y = [label for _, label in reader(args.assets)]
            x, seconds = embeddings(bundle, dataset, args.assets, args.cache)
            train, held = stratified_split(y, 0.2, seed=0)
            c_scores = choose_c(x, y, train)
            best = max(c_scores, key=lambda c: (c_scores[c], -c))
            rows = parity(x, y, train, held)
            entry = {
                "texts": len(y),
                "train": len(train),
                "held_out": len(held),
                "embed_s": seconds,
                "embed_texts_per_s": len(y) / seconds,
                "validation_by_C": c_scores,
                "chosen_C": best,
                "parity": rows,
            }
            if b == 0 and args.few_shot:  # few-shot curves on the first (fp32) bundle
                entry["few_shot"] = {}
                for C in FEW_SHOT_CS:
                    curve = few_shot(x, y, train, held, C)
                    entry["few_shot"][C] = curve
                    name = f"{dataset} ({len(set(y))} labels), C={C:g}"
                    curves[name] = curve
                    full[name] = next(r["ours"] for r in rows if r["C"] == C)
            per_bundle[dataset] = entry
            print(json.dumps({str(bundle): {dataset: entry}}, indent=1, default=str))
    if curves:
        plot(curves, full, args.plot)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
