"""Export a SetFit-style classifier (sentence-transformer body + linear head) as ONE bundle.

The body is a sentence-transformers folder (pooling and normalisation read from its
files); the head is a scikit-learn linear model (``LogisticRegression``, ``LinearSVC``,
``RidgeClassifier``, ``SGDClassifier``...) saved with joblib, optionally with a
``label_map`` (class -> name). The bundle's graph is encoder -> pooling -> normalise ->
MatMul + Add, so the device needs neither scikit-learn nor pickles: joblib files are
opened here, in the build stage, and only their numbers travel.

For a multinomial logistic regression the runtime's softmax over these logits is
exactly ``predict_proba``; for any linear model the arg-max is exactly ``predict``.

    python -m edge_slm_export.setfit BODY_DIR HEAD.joblib OUT_DIR --label-map label_map.joblib
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.cli.progress import Reporter, silent_reporter, stderr_reporter
from edge_slm.errors import EdgeSlmError
from edge_slm_export.encoder import DEFAULT_TOLERANCE, EncoderExportOptions, export_encoder
from edge_slm_export.errors import ExportError
from edge_slm_export.pooling import LinearHead


def linear_head(estimator: Any, label_map: Mapping[Any, Any] | None = None) -> LinearHead:
    """The weight, bias and label names of a fitted scikit-learn linear classifier.

    A binary model (one row of ``coef_``) becomes two rows ``[0, w]`` / ``[0, b]``, so
    softmax gives ``sigmoid(w·x + b)`` for the second class, as scikit-learn does.
    """
    coef = getattr(estimator, "coef_", None)
    intercept = getattr(estimator, "intercept_", None)
    classes = getattr(estimator, "classes_", None)
    if coef is None or classes is None:
        raise ExportError(
            f"{type(estimator).__name__} is not a fitted linear classifier (no coef_/classes_)"
        )
    weight = np.asarray(coef, dtype=np.float64)
    bias = np.zeros(weight.shape[0]) if intercept is None else np.asarray(intercept, np.float64)
    if weight.shape[0] == 1 and len(classes) == 2:
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([[0.0], bias.reshape(1)])
    names = []
    for cls in classes:
        name = cls
        if label_map is not None:
            name = label_map.get(cls, label_map.get(str(cls), cls))
        names.append(str(name))
    return LinearHead(weight.astype(np.float32), bias.astype(np.float32), tuple(names))


def load_sklearn_head(head_file: Path, label_map_file: Path | None = None) -> LinearHead:
    """Unpickle a joblib head (and label map) -- build stage only, trusted files only."""
    import warnings

    import joblib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InconsistentVersionWarning of older pickles
        estimator = joblib.load(head_file)
        label_map = joblib.load(label_map_file) if label_map_file else None
    if label_map is not None and not isinstance(label_map, Mapping):
        raise ExportError(f"{label_map_file}: a label map must be a dict, got {type(label_map)}")
    return linear_head(estimator, label_map)


def export_setfit(
    body: str,
    head: LinearHead,
    out_dir: str | Path,
    options: EncoderExportOptions | None = None,
    report: Reporter = silent_reporter,
) -> Path:
    """Export ``body`` (sentence-transformers folder) with ``head`` as one classifier bundle.

    Validated like every encoder export: the graph's logits against torch pooling +
    normalisation + the head in float64, within ``options.tolerance``.
    """
    return export_encoder(body, out_dir, "text-classification", options, report, head=head)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m edge_slm_export.setfit``."""
    parser = argparse.ArgumentParser(prog="python -m edge_slm_export.setfit", description=__doc__)
    parser.add_argument("body", help="sentence-transformers folder (e.g. all-MiniLM-L6-v2)")
    parser.add_argument("head", type=Path, help="joblib file of a fitted linear classifier")
    parser.add_argument("out_dir", type=Path, help="bundle folder to write")
    parser.add_argument("--label-map", type=Path, help="joblib dict: class -> label name")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = export_setfit(
            args.body,
            load_sklearn_head(args.head, args.label_map),
            args.out_dir,
            EncoderExportOptions(tolerance=args.tolerance, overwrite=args.overwrite),
            report=stderr_reporter,
        )
    except EdgeSlmError as exc:
        print(f"export.setfit: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
