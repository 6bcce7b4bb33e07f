"""Quantize an fp32 encoder bundle (classifier, tagger, embedder) to int8, measuring the cost.

Two methods, both from ``onnxruntime.quantization``:

* ``dynamic-int8``: weights of MatMul/Gemm stored as int8 (per output channel),
  activations quantized on the fly per batch (``quantize_dynamic``). Needs no data.
* ``static-int8``: QDQ graph; weights int8 per channel, activations uint8 with ranges
  measured once on a calibration file (``quantize_static`` with a
  ``CalibrationDataReader``), only MatMuls with constant weights (``MatMulConstBOnly``).
  The MatMuls fed by a GELU (the second layer of each feed-forward block) stay fp32 by
  default: their input has long tails that one static 8-bit range clips (measured on
  the fine-tuned MiniLM sentiment model: 81.8% held-out accuracy with them quantized,
  83.6% without, fp32 83.2%; see docs/classification.md).

Both quantize the embedding tables too (``Gather``, int8), unless told not to: they are
half of a small encoder's bytes (MiniLM: 91 MB fp32 -> 23 MB dynamic-int8).

With an evaluation file (labelled JSONL/CSV, see :mod:`edge_slm.text.records`) the accuracy of
the fp32 and the quantized bundle are measured on it and recorded in the manifest's
``quantization`` section; with ``max_accuracy_drop_points`` the quantized bundle is
refused (AccuracyDropError, nothing written) when it loses more than that many
percentage points. For a token classifier the evaluation file's texts give the share of
tokens whose label is the fp32 bundle's (``details.token_label_agreement``).

    python -m edge_slm_quantize.encoder BUNDLE OUT --method static-int8 \\
        --calibration calib.txt --eval test.jsonl --max-accuracy-drop 0.5
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import Manifest, Quantization, read_bundle, sha256_file, write_manifest
from edge_slm.cli.progress import Reporter, silent_reporter, stderr_reporter, step
from edge_slm.encoders.classify import TextClassifier
from edge_slm.encoders.embed import TextEmbedder, normalize_rows
from edge_slm.encoders.encoder import EncoderModel, TextInput
from edge_slm.encoders.token_classify import TokenClassifier
from edge_slm.errors import EdgeSlmError
from edge_slm.text.records import Record, read_records
from edge_slm_quantize.errors import AlreadyQuantizedError, QuantizationError, UnknownMethodError

ENCODER_METHODS = ("dynamic-int8", "static-int8")
DEFAULT_CALIBRATION_EXAMPLES = 1000
_OP_TYPES = ["MatMul", "Gemm"]
# Ops whose output is a GELU (erf or tanh form, or a fused contrib op).
_GELU_MARKERS = {"Erf", "Tanh", "Gelu", "FastGelu", "BiasGelu"}
_GELU_DEPTH = 4


class AccuracyDropError(QuantizationError):
    """The quantized bundle loses more accuracy than the caller allows."""


@dataclass(frozen=True)
class EvalResult:
    """Accuracy (fraction in [0, 1]) of a classifier on ``examples`` labelled records."""

    accuracy: float
    examples: int


def _quiet_quantizer() -> None:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)


def read_labelled(path: Path, labels: Sequence[str]) -> list[Record]:
    """The labelled records of an evaluation file; labels must be the bundle's.

    A label may be a label name or its index in the bundle's label list.
    """
    records = []
    for record in read_records(path):
        if record.labels is None:
            raise QuantizationError(f"evaluation file {str(path)!r}: a record has no label")
        names = []
        for label in record.labels:
            if label not in labels and label.isdigit() and int(label) < len(labels):
                label = labels[int(label)]
            if label not in labels:
                raise QuantizationError(
                    f"evaluation file {str(path)!r}: label {label!r} is not one of the "
                    f"bundle's labels {list(labels)}"
                )
            names.append(label)
        records.append(replace(record, labels=tuple(names)))
    if not records:
        raise QuantizationError(f"evaluation file {str(path)!r} has no records")
    return records


def accuracy(classifier: TextClassifier, records: Sequence[Record], batch_size: int = 32) -> float:
    """Share of records whose predicted label set equals the expected one.

    Single-label: the top label; multi-label: every label with probability >= 0.5.
    """
    texts = [r.text for r in records]
    results = classifier.classify(texts, batch_size=batch_size, truncation="silent")
    hits = sum(
        set(result.labels) == set(record.labels or ())
        for result, record in zip(results, records, strict=True)
    )
    return hits / len(records)


def embedding_agreement(
    before: TextEmbedder, after: TextEmbedder, texts: Sequence[TextInput]
) -> dict[str, float]:
    """Mean and minimum cosine similarity between fp32 and quantized embeddings."""
    a = normalize_rows(before.embed_all(texts, truncation="silent"))
    b = normalize_rows(after.embed_all(texts, truncation="silent"))
    cosine = (a * b).sum(axis=1)
    return {"mean_cosine_to_fp32": float(cosine.mean()), "min_cosine_to_fp32": float(cosine.min())}


def token_agreement(
    before: TokenClassifier, after: TokenClassifier, texts: Sequence[str]
) -> dict[str, float]:
    """Share of tokens labelled alike by the fp32 and the quantized tagger, and the mean
    absolute difference of the best label's probability."""
    options: dict[str, Any] = {"aggregation": "none", "ignore_labels": [], "truncation": "silent"}
    same = total = 0
    diffs = []
    pairs = zip(before.classify(texts, **options), after.classify(texts, **options), strict=True)
    for a, b in pairs:
        same += sum(x.label == y.label for x, y in zip(a.entities, b.entities, strict=True))
        total += len(a.entities)
        diffs += [abs(x.score - y.score) for x, y in zip(a.entities, b.entities, strict=True)]
    return {
        "token_label_agreement": same / max(total, 1),
        "mean_abs_score_diff": float(np.mean(diffs)) if diffs else 0.0,
        "tokens": total,
    }


def calibration_texts(path: Path, limit: int = DEFAULT_CALIBRATION_EXAMPLES) -> list[TextInput]:
    """The first ``limit`` texts of a calibration file (labels, if any, are ignored)."""
    texts = [record.text for _, record in zip(range(limit), read_records(path), strict=False)]
    if not texts:
        raise QuantizationError(f"calibration file {str(path)!r} has no texts")
    return texts


class _CalibrationReader:
    """Feeds the calibration texts one at a time (no padding to skew activation ranges)."""

    def __init__(self, model: EncoderModel, texts: Sequence[TextInput]) -> None:
        self._model = model
        self._feeds: Iterator[dict[str, np.ndarray]] = self._make(texts)

    def _make(self, texts: Sequence[TextInput]) -> Iterator[dict[str, np.ndarray]]:
        io = self._model.io
        for text in texts:
            batch = self._model.encode([text], truncation="silent")
            feed = {io.input_ids: batch.input_ids, io.attention_mask: batch.attention_mask}
            if io.token_type_ids is not None:
                feed[io.token_type_ids] = batch.token_type_ids
            yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # onnxruntime >= 1.17 may call it; calibration runs once
        return None


def gelu_fed_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMuls whose activation input comes from a GELU (within 4 nodes)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        frontier, seen = [node.input[0]], set()
        for _ in range(_GELU_DEPTH):
            parents = [producer[name] for name in frontier if name in producer]
            if any(p.op_type in _GELU_MARKERS for p in parents):
                found.append(node.name)
                break
            frontier = [i for p in parents if p.name not in seen for i in p.input]
            seen.update(p.name for p in parents)
    return found


def _quantize_graph(
    src: Path,
    dst: Path,
    method: str,
    model: EncoderModel,
    calibration: list[TextInput] | None,
    per_channel: bool,
    quantize_embeddings: bool,
    keep_fp32_after_gelu: bool,
) -> dict[str, Any]:
    """Write the quantized graph of ``src`` to ``dst``; returns facts for the manifest."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    _quiet_quantizer()
    op_types = _OP_TYPES + (["Gather"] if quantize_embeddings else [])
    facts: dict[str, Any] = {"per_channel": per_channel, "embeddings": quantize_embeddings}
    if method == "dynamic-int8":
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=op_types,
        )
        return {"weights": "int8", "activations": "dynamic uint8", **facts}
    assert calibration is not None
    excluded = gelu_fed_matmuls(src) if keep_fp32_after_gelu else []

    class Reader(_CalibrationReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    quantize_static(
        str(src),
        str(dst),
        Reader(model, calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        nodes_to_exclude=excluded,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True},
    )
    return {
        "weights": "int8",
        "activations": "uint8 (static, MinMax)",
        "format": "QDQ",
        "calibration_examples": len(calibration),
        "fp32_matmuls_after_gelu": len(excluded),
        **facts,
    }


def _count_ops(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in (
            "MatMul",
            "Gemm",
            "MatMulInteger",
            "DynamicQuantizeMatMul",
            "Gather",
            "DequantizeLinear",
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "QuantizeLinear":
            counts["QuantizeLinear"] = counts.get("QuantizeLinear", 0) + 1
    return counts


def _prepare(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise QuantizationError(
                f"output folder {str(out_dir)!r} is not empty (pass --overwrite)"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _load(folder: Path, manifest: Manifest) -> TextClassifier | TokenClassifier | TextEmbedder:
    if manifest.task == "text-classification":
        return TextClassifier(folder, manifest)
    if manifest.task == "token-classification":
        return TokenClassifier(folder, manifest)
    return TextEmbedder(folder, manifest)


def quantize_encoder_bundle(
    bundle: str | Path,
    out_dir: str | Path,
    method: str,
    *,
    calibration: str | Path | None = None,
    eval_file: str | Path | None = None,
    max_accuracy_drop_points: float | None = None,
    calibration_examples: int = DEFAULT_CALIBRATION_EXAMPLES,
    per_channel: bool = True,
    quantize_embeddings: bool = True,
    keep_fp32_after_gelu: bool = True,
    overwrite: bool = False,
    report: Reporter = silent_reporter,
) -> Path:
    """Quantize the fp32 encoder bundle ``bundle`` into ``out_dir`` with ``method``.

    Args:
        method: "dynamic-int8" or "static-int8".
        calibration: texts for static-int8 activation ranges (JSONL/CSV/one per line).
        eval_file: labelled records (classifiers: accuracy before/after) or texts
            (embedders: cosine agreement with fp32).
        max_accuracy_drop_points: refuse a classifier that loses more than this many
            percentage points of accuracy on ``eval_file``.
        calibration_examples: use at most this many calibration texts.
        per_channel: one weight scale per output channel (else per tensor).
        quantize_embeddings: store the embedding tables (Gather) as int8 too.
        keep_fp32_after_gelu: static-int8 leaves the MatMuls fed by a GELU in fp32.

    Raises:
        UnknownMethodError, AlreadyQuantizedError, QuantizationError, AccuracyDropError.
    """
    if method not in ENCODER_METHODS:
        raise UnknownMethodError(f"method {method!r} is not one of {list(ENCODER_METHODS)}")
    source, out_dir = Path(bundle), Path(out_dir)
    manifest = read_bundle(source)
    if manifest.task not in ("text-classification", "token-classification", "feature-extraction"):
        raise QuantizationError(
            f"{str(source)!r} is a {manifest.task} bundle; encoder methods need "
            "text-classification, token-classification or feature-extraction (use --method "
            "int8/int4-search for decoders)"
        )
    if manifest.quantization.method != "none":
        raise AlreadyQuantizedError(
            f"{str(source)!r} is already quantized ({manifest.quantization.method}); "
            "quantize the fp32 bundle"
        )
    if method == "static-int8" and calibration is None:
        raise QuantizationError("static-int8 needs a calibration file (--calibration FILE)")
    if max_accuracy_drop_points is not None:
        if eval_file is None:
            raise QuantizationError("--max-accuracy-drop needs an evaluation file (--eval FILE)")
        if manifest.task != "text-classification":
            raise QuantizationError("--max-accuracy-drop applies to text-classification bundles")
    records = (
        read_labelled(Path(eval_file), manifest.labels or [])
        if (eval_file is not None and manifest.task == "text-classification")
        else None
    )
    _prepare(out_dir, overwrite)
    try:
        fp32 = _load(source, manifest)
        texts = calibration_texts(Path(calibration), calibration_examples) if calibration else None
        src_model = source / manifest.files["model"]
        with tempfile.TemporaryDirectory(prefix="edge-slm-quant-") as tmp:
            with step(report, f"quantizing ({method})"):
                facts = _quantize_graph(
                    src_model,
                    Path(tmp) / "model.onnx",
                    method,
                    fp32.model,
                    texts,
                    per_channel,
                    quantize_embeddings,
                    keep_fp32_after_gelu,
                )
            shutil.copy2(Path(tmp) / "model.onnx", out_dir / "model.onnx")
        shutil.copy2(source / manifest.files["tokenizer"], out_dir / "tokenizer.json")
        facts["ops"] = _count_ops(out_dir / "model.onnx")
        if calibration is not None:
            facts["calibration_file"] = Path(calibration).name
            facts["calibration_sha256"] = sha256_file(Path(calibration))
        new_manifest = replace(
            manifest, files={"model": "model.onnx", "tokenizer": "tokenizer.json"}
        )
        quantized = _load(out_dir, new_manifest)
        quantization = Quantization(
            method=method,
            bits=8,
            symmetric=True,
            size_before_bytes=src_model.stat().st_size,
            size_after_bytes=(out_dir / "model.onnx").stat().st_size,
            details=facts,
        )
        if eval_file is not None:
            eval_path = Path(eval_file)
            quantization = replace(
                quantization, eval_text=eval_path.name, eval_text_sha256=sha256_file(eval_path)
            )
            with step(report, f"evaluating on {eval_path.name}"):
                if records is not None:
                    assert isinstance(fp32, TextClassifier)
                    assert isinstance(quantized, TextClassifier)
                    before, after = accuracy(fp32, records), accuracy(quantized, records)
                    quantization = replace(
                        quantization,
                        accuracy_before=before,
                        accuracy_after=after,
                        eval_examples=len(records),
                    )
                    report(f"  accuracy {100 * before:.2f}% -> {100 * after:.2f}%")
                    drop = 100 * (before - after)
                    if max_accuracy_drop_points is not None and drop > max_accuracy_drop_points:
                        raise AccuracyDropError(
                            f"{method} loses {drop:.2f} accuracy points on {eval_path.name} "
                            f"({100 * before:.2f}% -> {100 * after:.2f}%), more than the "
                            f"allowed {max_accuracy_drop_points:g}; no bundle written"
                        )
                elif isinstance(fp32, TokenClassifier):
                    assert isinstance(quantized, TokenClassifier)
                    texts = [str(r.text) for r in read_records(eval_path)]
                    agreement = token_agreement(fp32, quantized, texts)
                    quantization = replace(
                        quantization,
                        eval_examples=len(texts),
                        details={**facts, **agreement},
                    )
                    report(
                        f"  token labels as fp32: {100 * agreement['token_label_agreement']:.2f}%"
                    )
                else:
                    assert isinstance(fp32, TextEmbedder) and isinstance(quantized, TextEmbedder)
                    eval_texts = [r.text for r in read_records(eval_path)]
                    agreement = embedding_agreement(fp32, quantized, eval_texts)
                    quantization = replace(
                        quantization,
                        eval_examples=len(eval_texts),
                        details={**facts, **agreement},
                    )
        write_manifest(out_dir, replace(new_manifest, quantization=quantization))
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m edge_slm_quantize.encoder`` (and of encoder bundles in ``edge-slm quantize``)."""
    parser.add_argument("bundle", type=Path, help="fp32 encoder bundle folder")
    parser.add_argument("out_dir", type=Path, help="quantized bundle folder to write")
    parser.add_argument("--method", required=True, choices=ENCODER_METHODS)
    parser.add_argument("--calibration", type=Path, help="texts for static-int8 (JSONL/CSV/txt)")
    parser.add_argument(
        "--calibration-examples",
        type=int,
        default=DEFAULT_CALIBRATION_EXAMPLES,
        help=f"calibration texts used at most (default {DEFAULT_CALIBRATION_EXAMPLES})",
    )
    parser.add_argument("--eval", type=Path, dest="eval_file", help="labelled JSONL/CSV")
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        dest="max_accuracy_drop",
        help="refuse if accuracy drops by more than this many percentage points",
    )
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per tensor (default: per channel)",
    )
    parser.add_argument(
        "--no-quantize-embeddings", action="store_true", help="keep the embedding tables fp32"
    )
    parser.add_argument(
        "--quantize-after-gelu",
        action="store_true",
        help="static-int8: also quantize the MatMuls fed by a GELU (smaller, less accurate)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    """Quantize and print a one-line summary; errors go to stderr with exit code 2."""
    try:
        out = quantize_encoder_bundle(
            args.bundle,
            args.out_dir,
            args.method,
            calibration=args.calibration,
            eval_file=args.eval_file,
            max_accuracy_drop_points=args.max_accuracy_drop,
            calibration_examples=args.calibration_examples,
            per_channel=not args.per_tensor,
            quantize_embeddings=not args.no_quantize_embeddings,
            keep_fp32_after_gelu=not args.quantize_after_gelu,
            overwrite=args.overwrite,
            report=stderr_reporter,
        )
    except EdgeSlmError as exc:
        print(f"edge-slm quantize: error: {exc}", file=sys.stderr)
        return 2
    q = read_bundle(out, verify=False).quantization
    line = f"{out}: {q.method}, {q.size_before_bytes} -> {q.size_after_bytes} bytes"
    if q.accuracy_before is not None and q.accuracy_after is not None:
        line += f", accuracy {100 * q.accuracy_before:.2f}% -> {100 * q.accuracy_after:.2f}%"
    print(line)
    return 0


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m edge_slm_quantize.encoder"
) -> int:
    """Entry point of ``python -m edge_slm_quantize.encoder`` (and of encoder methods in ``quantize``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
