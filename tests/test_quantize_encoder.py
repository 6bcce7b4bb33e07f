"""Encoder quantization: dynamic and static int8 bundles load, agree with fp32, record accuracy."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from tiny_encoders import CORPUS, build_classifier, build_sentence_transformer

import edge_slm
from edge_slm import TextClassifier, TextEmbedder
from edge_slm.bundle import read_bundle
from edge_slm_export.encoder import export_encoder
from edge_slm_quantize.encoder import AccuracyDropError, quantize_encoder_bundle
from edge_slm_quantize.errors import AlreadyQuantizedError, QuantizationError, UnknownMethodError

WORDS = " ".join(CORPUS).replace(".", "").replace(",", "").split()
# 120 short deterministic texts made of the tokenizer's corpus words
TEXTS = [
    " ".join(WORDS[(i * a + b) % len(WORDS)] for i in range(6))
    for a, b in product(range(1, 13), range(10))
]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q-enc")
    return {
        "classifier": export_encoder(
            str(build_classifier("bert", root / "c-src", seed=4)), root / "classifier"
        ),
        "embedder": export_encoder(
            str(build_sentence_transformer(root / "e-src", seed=5)), root / "embedder"
        ),
    }


@pytest.fixture(scope="module")
def files(fp32: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibration file, and an evaluation file labelled with the fp32 predictions."""
    root = tmp_path_factory.mktemp("q-files")
    calibration = root / "calibration.txt"
    calibration.write_text("\n".join(TEXTS[::2]) + "\n", encoding="utf-8")
    clf = edge_slm.load(fp32["classifier"])
    assert isinstance(clf, TextClassifier)
    evaluation = root / "eval.jsonl"
    with open(evaluation, "w", encoding="utf-8") as fh:
        for text, result in zip(TEXTS, clf.classify(TEXTS), strict=True):
            fh.write(json.dumps({"text": text, "label": result.label}) + "\n")
    return {"calibration": calibration, "eval": evaluation}


@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8"])
def test_quantized_classifier_agrees_and_records_accuracy(
    method: str, fp32: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    out = quantize_encoder_bundle(
        fp32["classifier"],
        tmp_path / method,
        method,
        calibration=files["calibration"],
        eval_file=files["eval"],
    )
    manifest = read_bundle(out)
    q = manifest.quantization
    assert q.method == method and q.bits == 8
    assert q.accuracy_before == 1.0  # the eval labels are the fp32 predictions
    assert q.accuracy_after is not None and q.accuracy_after >= 0.8
    assert q.eval_examples == len(TEXTS) and q.eval_text == "eval.jsonl"
    ops = q.details["ops"]
    assert (
        ops.get("MatMulInteger", 0)
        + ops.get("DynamicQuantizeMatMul", 0)
        + ops.get("QuantizeLinear", 0)
        > 0
    )
    clf = edge_slm.load(out)
    assert isinstance(clf, TextClassifier)
    base = edge_slm.load(fp32["classifier"])
    assert isinstance(base, TextClassifier)
    agree = np.mean(
        [a.label == b.label for a, b in zip(clf.classify(TEXTS), base.classify(TEXTS), strict=True)]
    )
    assert agree == pytest.approx(q.accuracy_after)
    assert not np.array_equal(clf.logits(TEXTS[:4]), base.logits(TEXTS[:4]))  # really changed


def test_quantized_embedder_stays_close(
    fp32: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    out = quantize_encoder_bundle(
        fp32["embedder"],
        tmp_path / "e",
        "static-int8",
        calibration=files["calibration"],
        eval_file=files["calibration"],
    )
    details = read_bundle(out).quantization.details
    assert details["mean_cosine_to_fp32"] > 0.98
    emb = edge_slm.load(out)
    assert isinstance(emb, TextEmbedder)
    assert emb.embed("hello").shape == (32,)


def test_refuses_a_bundle_that_loses_too_much(
    fp32: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    # A calibration set of one text gives poor activation ranges: some prediction flips.
    one = tmp_path / "one.txt"
    one.write_text("the\n", encoding="utf-8")
    out = tmp_path / "refused"
    with pytest.raises(AccuracyDropError, match=r"loses \d+\.\d+ accuracy points.*allowed 0"):
        quantize_encoder_bundle(
            fp32["classifier"],
            out,
            "static-int8",
            calibration=one,
            eval_file=files["eval"],
            max_accuracy_drop_points=0.0,
        )
    assert not out.exists()


def test_typed_errors(fp32: dict[str, Path], files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnknownMethodError, match="'int3' is not one of"):
        quantize_encoder_bundle(fp32["classifier"], tmp_path / "a", "int3")
    with pytest.raises(QuantizationError, match="needs a calibration file"):
        quantize_encoder_bundle(fp32["classifier"], tmp_path / "b", "static-int8")
    with pytest.raises(QuantizationError, match="needs an evaluation file"):
        quantize_encoder_bundle(
            fp32["classifier"], tmp_path / "c", "dynamic-int8", max_accuracy_drop_points=1.0
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "happy"}) + "\n")
    with pytest.raises(QuantizationError, match="label 'happy' is not one of"):
        quantize_encoder_bundle(fp32["classifier"], tmp_path / "d", "dynamic-int8", eval_file=bad)
    done = quantize_encoder_bundle(fp32["classifier"], tmp_path / "e", "dynamic-int8")
    with pytest.raises(AlreadyQuantizedError):
        quantize_encoder_bundle(done, tmp_path / "f", "dynamic-int8")


def test_static_keeps_the_matmuls_after_gelu_in_fp32(
    fp32: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    from edge_slm_quantize.encoder import gelu_fed_matmuls

    names = gelu_fed_matmuls(fp32["classifier"] / "model.onnx")
    assert len(names) == 2 and all("output/dense" in n for n in names)  # one per layer
    out = quantize_encoder_bundle(
        fp32["classifier"], tmp_path / "s", "static-int8", calibration=files["calibration"]
    )
    assert read_bundle(out).quantization.details["fp32_matmuls_after_gelu"] == 2
    every = quantize_encoder_bundle(
        fp32["classifier"],
        tmp_path / "all",
        "static-int8",
        calibration=files["calibration"],
        keep_fp32_after_gelu=False,
    )
    assert read_bundle(every).quantization.details["fp32_matmuls_after_gelu"] == 0


def test_edge_slm_quantize_dispatches_encoder_methods(
    fp32: dict[str, Path],
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edge_slm.cli.main import main

    out = tmp_path / "cli-int8"
    args = ["quantize", str(fp32["classifier"]), str(out), "--method", "static-int8"]
    args += ["--calibration", str(files["calibration"]), "--eval", str(files["eval"])]
    assert main(args) == 0
    assert "accuracy" in capsys.readouterr().out
    assert edge_slm.load(out).manifest.quantization.method == "static-int8"
