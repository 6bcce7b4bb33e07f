"""``edge-slm train``: teach an embedder bundle new labels from a CSV file of examples.

    edge-slm train bundles/minilm feedback.csv bundles/feedback
    edge-slm train bundles/minilm tickets.csv bundles/router --label-column queue \\
        --class-weight balanced --C 10 --holdout 0.2 --seed 0

Embeds the texts, fits a logistic-regression head in NumPy
(:mod:`edge_slm.encoders.train_head`), writes a classifier bundle and prints the
held-out accuracy and the time taken. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_slm.bundle import read_bundle, sha256_file
from edge_slm.cli.progress import Progress
from edge_slm.encoders.logistic import DEFAULT_C, ClassWeight
from edge_slm.encoders.train_head import DEFAULT_HOLDOUT, read_examples, train_classifier
from edge_slm.errors import InvalidArgumentError


def add_train_command(sub: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an argparse subparsers object."""
    cmd: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="teach an embedder bundle new labels (no torch, no scikit-learn)",
        description="Fit a logistic-regression head on an embedder bundle's vectors of\n"
        "labelled examples (a CSV file with a header) and write a classifier bundle:\n"
        "the embedder and the head in one graph. A share of each label's examples is\n"
        "held out to report accuracy.",
    )
    cmd.add_argument(
        "embedder", type=Path, metavar="EMBEDDER_BUNDLE", help="a feature-extraction bundle"
    )
    cmd.add_argument("examples", type=Path, metavar="EXAMPLES", help="CSV (or .tsv) with a header")
    cmd.add_argument("out", type=Path, metavar="OUT", help="classifier bundle folder to write")
    cmd.add_argument("--text-column", default="text", help="column holding the texts")
    cmd.add_argument("--label-column", default="label", help="column holding the labels")
    cmd.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help="share of each label's examples kept out of the fit to measure accuracy (0: none)",
    )
    cmd.add_argument(
        "--C",
        dest="C",
        type=float,
        default=DEFAULT_C,
        help="inverse L2 regularisation strength, as scikit-learn's C (larger: fits closer)",
    )
    cmd.add_argument(
        "--class-weight",
        metavar="WEIGHTS",
        help="'balanced' (weigh labels inversely to their counts) or JSON {label: weight}",
    )
    cmd.add_argument("--seed", type=int, default=0, help="shuffle of the held-out split")
    cmd.add_argument("--batch-size", type=int, default=32, help="texts per embedder run")
    cmd.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    cmd.add_argument("--json", action="store_true", help="print the training report as JSON")
    return cmd


def parse_class_weight(value: str | None) -> ClassWeight:
    """None, ``"balanced"`` or a JSON object label -> positive number."""
    if value is None or value == "balanced":
        return value
    try:
        weights = json.loads(value)
    except json.JSONDecodeError:
        weights = None
    if not isinstance(weights, dict):
        raise InvalidArgumentError(
            f"--class-weight must be 'balanced' or a JSON object {{label: weight}}, got {value!r}"
        )
    return weights


def run_train(args: argparse.Namespace) -> int:
    """Run ``edge-slm train``; returns the exit status."""
    class_weight = parse_class_weight(args.class_weight)
    examples = read_examples(args.examples, args.text_column, args.label_column)
    read_bundle(args.embedder)  # a bad embedder fails before the progress bar
    with Progress(total=len(examples), label="embedding", unit="texts") as bar:
        result = train_classifier(
            args.embedder,
            examples,
            args.out,
            C=args.C,
            class_weight=class_weight,
            holdout=args.holdout,
            seed=args.seed,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            data_sha256=sha256_file(args.examples),
            progress=bar.update,
        )
    t = result.training
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"bundle": str(result.path), **asdict(t)}))
        return 0
    counts = ", ".join(f"{label} {n}" for label, n in t.examples_per_label.items())
    print(f"labels: {len(t.examples_per_label)} ({counts})", file=sys.stderr)
    print(
        f"embedding: {t.embed_seconds:.1f} s for {t.examples + t.holdout_examples} "
        f"texts; fitting: {t.fit_seconds:.2f} s ({t.iterations} L-BFGS iterations"
        f"{'' if t.converged else ', not converged'})",
        file=sys.stderr,
    )
    if t.holdout_accuracy is None:
        print("held-out accuracy: - (--holdout 0)", file=sys.stderr)
    else:
        print(
            f"held-out accuracy: {100 * t.holdout_accuracy:.1f}% on {t.holdout_examples} examples",
            file=sys.stderr,
        )
    print(result.path)
    return 0
