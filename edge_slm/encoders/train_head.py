"""Teach an embedder new labels on the device: fit a head, write a classifier bundle.

    >>> examples = read_examples("feedback.csv")            # (text, label) rows
    >>> result = train_classifier("bundles/minilm", examples, "bundles/feedback")
    >>> result.training.holdout_accuracy
    0.78
    >>> edge_slm.load("bundles/feedback").classify("Slow delivery").label
    'negative'

The texts are embedded by the embedder bundle (a ``feature-extraction`` bundle such as
all-MiniLM-L6-v2), a logistic-regression head is fitted on the vectors in NumPy
(:mod:`edge_slm.encoders.logistic`: scikit-learn's objective, no scikit-learn, scipy or
torch), and the head is appended to the embedder's graph
(:mod:`edge_slm.encoders.onnx_head`), so the result is an ordinary
``text-classification`` bundle: one ``model.onnx`` whose ``logits`` the runtime turns
into probabilities with a softmax (scikit-learn's ``predict_proba``). Its manifest
carries the labels, the checksums and a ``training`` section (data, C, class weights,
held-out accuracy, times).

A stratified share of the examples (``holdout``, 20% by default) is kept out of the fit
to measure accuracy; the shipped head is the one measured.
"""

from __future__ import annotations

import csv
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_slm.bundle import (
    Manifest,
    Provenance,
    Training,
    Validation,
    limits,
    read_bundle,
    read_manifest,
    sha256_file,
    write_manifest,
)
from edge_slm.encoders.classify import TextClassifier
from edge_slm.encoders.embed import TextEmbedder
from edge_slm.encoders.logistic import (
    DEFAULT_C,
    ClassWeight,
    LinearHead,
    fit_logistic,
)
from edge_slm.encoders.onnx_head import head_patch
from edge_slm.errors import BundleError, InvalidArgumentError
from edge_slm.text.inputs import check_text

DEFAULT_HOLDOUT = 0.2
MAX_LABEL_CHARS = 100
"""Longer "labels" are almost always a text column read as the label column."""
VALIDATION_TEXTS = 8
VALIDATION_TOLERANCE = 1e-4
METHOD = "logistic-regression-lbfgs"

Example = tuple[str, str]  # (text, label)


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class TrainedClassifier:
    """What :func:`train_classifier` wrote and measured.

    Attributes:
        path: the classifier bundle folder.
        training: the manifest's ``training`` section (accuracy, counts, times).
        head: the fitted head (weights, bias, labels).
        max_abs_logit_diff: the bundle's logits against ``head`` on the same vectors.
    """

    path: Path
    training: Training
    head: LinearHead
    max_abs_logit_diff: float


def read_examples(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> list[Example]:
    """(text, label) pairs from a CSV (or ``.tsv``) file with a header row.

    Raises:
        InvalidArgumentError: the file is missing or not UTF-8 text, the header lacks a
            column, or a row has no text or no label (the message names the row).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"examples file {str(path)!r} does not exist")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    examples: list[Example] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise InvalidArgumentError(f"{path} is empty: it needs a header row")
            missing = [c for c in (text_column, label_column) if c not in header]
            if missing:
                raise InvalidArgumentError(
                    f"{path}: the header has no column {missing[0]!r}; its columns: {header} "
                    "(choose them with --text-column / --label-column)"
                )
            text_at, label_at = header.index(text_column), header.index(label_column)
            for number, row in enumerate(reader, 1):
                if not any(cell.strip() for cell in row):
                    continue  # a blank line
                where = f"{path} row {number} (line {reader.line_num})"
                examples.append(_example(row, text_at, label_at, where))
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise InvalidArgumentError(f"{path} is not valid CSV: {exc}") from None
    if not examples:
        raise InvalidArgumentError(f"{path} has a header but no examples")
    return examples


def _example(row: list[str], text_at: int, label_at: int, where: str) -> Example:
    if len(row) <= max(text_at, label_at):
        raise InvalidArgumentError(
            f"{where} has {len(row)} fields; the text and label columns are fields "
            f"{text_at + 1} and {label_at + 1}"
        )
    return check_example(row[text_at], row[label_at], where)


def check_example(text: object, label: object, where: str) -> Example:
    """``(text, label)`` with the label stripped; InvalidArgumentError naming ``where``."""
    text = check_text(text, f"{where}: the text")
    if not text.strip():
        raise InvalidArgumentError(f"{where}: the text is empty")
    if not isinstance(label, str) or not label.strip():
        raise InvalidArgumentError(f"{where}: the label is empty (got {label!r})")
    label = check_text(label.strip(), f"{where}: the label")
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidArgumentError(
            f"{where}: the label is {len(label)} characters long (at most {MAX_LABEL_CHARS}); "
            "is the label column the right one?"
        )
    return text, label


def stratified_split(
    labels: Sequence[str], holdout: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices (train, held out): ``holdout`` of each label's examples held out (rounded),
    at least one of each label kept for training. Shuffled with ``seed``; sorted."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise InvalidArgumentError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    train: list[int] = []
    held: list[int] = []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        count = min(round(holdout * len(rows)), len(rows) - 1)
        held += rows[:count]
        train += rows[count:]
    return sorted(train), sorted(held)


def embed_texts(
    embedder: TextEmbedder,
    texts: Sequence[str],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Vectors ``[len(texts), dim]``; texts over the context length are cut silently,
    as sentence-transformers does. ``progress(n)`` is called after each batch."""
    parts = []
    for batch in embedder.embed_batches(texts, batch_size=batch_size, truncation="silent"):
        parts.append(batch)
        if progress is not None:
            progress(len(batch))
    return np.concatenate(parts, axis=0)


def _check_class_weight(class_weight: ClassWeight) -> None:
    if class_weight is not None and not isinstance(class_weight, (str, Mapping)):
        raise InvalidArgumentError(
            f"class_weight must be None, 'balanced' or a dict label -> weight, "
            f"got {type(class_weight).__name__}"
        )


def train_classifier(
    embedder_bundle: str | Path,
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    C: float = DEFAULT_C,
    class_weight: ClassWeight = None,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    batch_size: int = 32,
    overwrite: bool = False,
    data_sha256: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrainedClassifier:
    """Fit a logistic-regression head on an embedder's vectors and write a classifier bundle.

    Args:
        embedder_bundle: a ``feature-extraction`` bundle folder (e.g. bundles/minilm).
        examples: (text, label) pairs; at least two different labels.
        out_dir: the classifier bundle folder to write (written whole or not at all).
        C: inverse L2 regularisation strength, as scikit-learn's ``C``.
        class_weight: None, ``"balanced"`` or a dict label -> weight.
        holdout: share of each label's examples kept out of the fit to measure accuracy.
        seed: the shuffle of the held-out split.
        batch_size: texts per embedder run.
        overwrite: replace an existing ``out_dir``.
        data_sha256: recorded in the manifest (the CLI passes the CSV file's).
        progress: called with the number of texts embedded after each batch.

    Raises:
        InvalidArgumentError: bad examples or options (names the example / value).
        BundleError: the embedder is not a feature-extraction bundle, ``out_dir``
            exists, or the written graph disagrees with the fitted head.
    """
    embedder_path = Path(embedder_bundle)
    out = Path(out_dir)
    if out.resolve() == embedder_path.resolve():
        raise InvalidArgumentError(f"the output folder {out} is the embedder bundle itself")
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    _check_class_weight(class_weight)
    checked = [check_example(t, y, f"example {i}") for i, (t, y) in enumerate(examples)]
    labels = [label for _, label in checked]
    counts = Counter(labels)
    if len(counts) < 2:
        raise InvalidArgumentError(
            f"a classifier needs at least two different labels, got {sorted(counts)}"
        )
    if len(counts) > limits.MAX_LABELS:
        raise InvalidArgumentError(f"{len(counts)} labels; at most {limits.MAX_LABELS}")
    train, held = stratified_split(labels, holdout, seed)
    manifest = read_bundle(embedder_path)
    embedder = TextEmbedder(embedder_path, manifest)

    start = time.perf_counter()
    vectors = embed_texts(embedder, [t for t, _ in checked], batch_size, progress)
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    head = fit_logistic(vectors[train], [labels[i] for i in train], C=C, class_weight=class_weight)
    fit_seconds = time.perf_counter() - start

    accuracy = None
    if held:
        predicted = head.predict(vectors[held])
        accuracy = float(np.mean([p == labels[i] for p, i in zip(predicted, held, strict=True)]))
    training = Training(
        method=METHOD,
        embedder=embedder_path.name,
        examples=len(train),
        examples_per_label=dict(sorted(Counter(labels[i] for i in train).items())),
        holdout_examples=len(held),
        holdout_accuracy=accuracy,
        C=float(C),
        class_weight=dict(class_weight) if isinstance(class_weight, Mapping) else class_weight,
        seed=seed,
        iterations=head.iterations,
        converged=head.converged,
        embed_seconds=round(embed_seconds, 3),
        fit_seconds=round(fit_seconds, 3),
        data_sha256=data_sha256,
    )
    probe = (held or train)[:VALIDATION_TEXTS]
    texts = [checked[i][0] for i in probe]
    diff = _write_bundle(embedder_path, manifest, head, training, out, texts, embedder)
    return TrainedClassifier(out, training, head, diff)


def _write_bundle(
    source: Path,
    manifest: Manifest,
    head: LinearHead,
    training: Training,
    out: Path,
    texts: list[str],
    embedder: TextEmbedder,
) -> float:
    """Write the bundle into a temporary folder beside ``out``, check it, move it in place.

    The check loads the new bundle like any classifier and compares its logits on
    ``texts`` with the head applied to ``embedder``'s vectors of the same batch (an int8
    embedder quantizes activations per batch, so only the same batch compares exactly).
    """
    assert manifest.encoder is not None
    _, checksums = read_manifest(source)
    embedding = manifest.encoder.output
    output = "logits" if embedding != "logits" else "head_logits"
    model_name = manifest.files["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in checksums:  # the graph, tokenizer and any external-data files
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, work / name)
        with open(work / model_name, "ab") as fh:
            fh.write(head_patch(embedding, head.weight.astype(np.float32),
                                head.bias.astype(np.float32), output))  # fmt: skip
        provenance = _provenance(manifest, source)
        draft = _classifier_manifest(manifest, head, training, output, provenance, None)
        write_manifest(work, draft)
        logits = TextClassifier(work, read_bundle(work)).logits(texts, truncation="silent")
        vectors = embedder.model.run(embedder.model.encode(texts, truncation="silent"))
        diff = float(np.max(np.abs(logits - head.logits(vectors))))
        if not diff <= VALIDATION_TOLERANCE:
            raise BundleError(
                f"the classifier graph's logits differ from the fitted head's by {diff:.3g} "
                f"(tolerance {VALIDATION_TOLERANCE})"
            )
        check = Validation(diff, VALIDATION_TOLERANCE, len(texts))
        final = _classifier_manifest(manifest, head, training, output, provenance, check)
        write_manifest(work, final)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return diff


def _provenance(embedder: Manifest, source: Path) -> Provenance:
    """Where the classifier came from: the embedder bundle (its graph's sha256) and the
    embedder's own source, with the versions that trained the head."""
    import onnxruntime

    from edge_slm import __version__

    return Provenance(
        source=str(source),
        source_kind="folder",
        source_sha256=sha256_file(source / embedder.files["model"]),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tools={
            "edge-slm": __version__,
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
            "embedder-source": embedder.provenance.source,
        },
    )


def _classifier_manifest(
    embedder: Manifest,
    head: LinearHead,
    training: Training,
    output: str,
    provenance: Provenance,
    validation: Validation | None,
) -> Manifest:
    """The embedder's manifest turned into a classifier's (same tokenizer and inputs)."""
    assert embedder.encoder is not None
    return replace(
        embedder,
        task="text-classification",
        labels=list(head.labels),
        encoder=replace(
            embedder.encoder, output=output, problem_type="single_label_classification"
        ),
        provenance=provenance,
        validation=validation,
        training=training,
    )


__all__ = [
    "TrainedClassifier",
    "check_example",
    "embed_texts",
    "read_examples",
    "stratified_split",
    "train_classifier",
]
