"""Encoder classifiers: export validation, parity with transformers, the runtime's API."""

from __future__ import annotations

import json
import warnings
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_encoders import ENCODERS, LABELS, build_classifier

import edge_slm
from edge_slm import ContextLengthError, InvalidArgumentError, TextClassifier, TruncationWarning
from edge_slm_export.encoder import EncoderExportOptions, detect_task, export_encoder
from edge_slm_export.errors import ValidationError

TEXTS = [
    "I loved this film, the acting was wonderful and the story moving.",
    "Terrible.",
    "Where is the nearest train station? How do I get to the airport?",
    "Café 東京 😀",
    "please reset my password",
]
PAIRS = [("How do I reset my password?", "Open the settings page."), ("Terrible.", "Great!")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enc-src")
    out = {family: build_classifier(family, root / family, seed=1) for family in ENCODERS}
    out["multi"] = build_classifier("bert", root / "multi", multi_label=True, seed=2)
    return out


@pytest.fixture(scope="module")
def bundles(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enc-bundles")
    return {name: export_encoder(str(src), root / name) for name, src in sources.items()}


def _torch_logits(source: Path, texts: list[Any], **kwargs: Any) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    rows = []
    for text in texts:
        enc = (
            tokenizer(text[0], text[1], return_tensors="pt", **kwargs)
            if isinstance(text, tuple)
            else tokenizer(text, return_tensors="pt", **kwargs)
        )
        if model.config.model_type == "distilbert":
            enc.pop("token_type_ids", None)
        with torch.no_grad():
            rows.append(model(**enc).logits[0].numpy())
    return np.stack(rows)


def _classifier(bundle: Path) -> TextClassifier:
    model = edge_slm.load(bundle)
    assert isinstance(model, TextClassifier)
    return model


@pytest.mark.parametrize("family", ENCODERS)
def test_logits_match_transformers(
    family: str, sources: dict[str, Path], bundles: dict[str, Path]
) -> None:
    clf = _classifier(bundles[family])
    inputs: list[Any] = [*TEXTS, *PAIRS]
    expected = _torch_logits(sources[family], inputs)
    got = clf.logits(inputs)  # one padded batch of singles and pairs
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1  # the check compares real, spread logits


@pytest.mark.parametrize("family", ENCODERS)
def test_manifest_records_labels_and_io(family: str, bundles: dict[str, Path]) -> None:
    manifest = edge_slm.bundle.read_bundle(bundles[family])
    assert manifest.task == "text-classification"
    assert manifest.labels == list(LABELS)
    assert manifest.encoder is not None
    assert manifest.encoder.problem_type == "single_label_classification"
    assert (manifest.encoder.token_type_ids is not None) == (family == "bert")
    assert manifest.validation is not None and manifest.validation.max_abs_logit_diff < 1e-4


def test_single_label_scores_are_softmax(bundles: dict[str, Path]) -> None:
    clf = _classifier(bundles["bert"])
    logits = clf.logits([TEXTS[0]])[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    result = clf.classify(TEXTS[0], top_k=3)
    assert result.labels == tuple(LABELS[i] for i in np.argsort(-probs))
    np.testing.assert_allclose(result.scores, np.sort(probs)[::-1], atol=1e-6)
    assert clf.classify(TEXTS[0]).labels == result.labels[:1]  # default top_k=1


def test_multi_label_sigmoid_and_threshold(
    sources: dict[str, Path], bundles: dict[str, Path]
) -> None:
    clf = _classifier(bundles["multi"])
    assert clf.multi_label
    expected = 1 / (1 + np.exp(-_torch_logits(sources["multi"], TEXTS)))
    for text, row in zip(TEXTS, expected, strict=True):
        everything = clf.classify(text, threshold=0.0)
        assert len(everything.labels) == len(LABELS)
        np.testing.assert_allclose(everything.scores, np.sort(row)[::-1], atol=1e-5)
        default = clf.classify(text)  # threshold 0.5
        assert set(default.labels) == {LABELS[i] for i in np.flatnonzero(row >= 0.5)}
    assert any(0 < len(clf.classify(t).labels) < len(LABELS) for t in TEXTS)


def test_pairs_match_transformers(sources: dict[str, Path], bundles: dict[str, Path]) -> None:
    clf = _classifier(bundles["bert"])
    expected = _torch_logits(sources["bert"], PAIRS)
    results = list(clf.classify(PAIRS, top_k=3))
    for result, row in zip(results, expected, strict=True):
        assert result.label == LABELS[int(np.argmax(row))]
    # a pair is not the same input as its first text alone
    assert not np.allclose(clf.logits([PAIRS[0]]), clf.logits([PAIRS[0][0]]))


@pytest.mark.parametrize("family", ENCODERS)
def test_batching_equals_one_by_one(family: str, bundles: dict[str, Path]) -> None:
    clf = _classifier(bundles[family])
    inputs: list[Any] = [*TEXTS, *PAIRS] * 2
    batched = list(clf.classify(inputs, top_k=3, batch_size=4))
    single = [next(iter(clf.classify([t], top_k=3, batch_size=1))) for t in inputs]
    assert [r.labels for r in batched] == [r.labels for r in single]
    np.testing.assert_allclose(
        [r.scores for r in batched], [r.scores for r in single], atol=1e-5, rtol=0
    )
    sizes = [len(b) for b in clf.classify_batches(inputs, batch_size=4)]
    assert sizes == [4, 4, 4, 2]


def test_large_iterable_is_consumed_lazily(bundles: dict[str, Path]) -> None:
    clf = _classifier(bundles["distilbert"])
    endless = (f"message number {i}" for i in count())
    first = list(islice(clf.classify(endless, batch_size=8), 10))
    assert len(first) == 10 and all(r.label in LABELS for r in first)


def test_truncation_error_warn_silent(sources: dict[str, Path], bundles: dict[str, Path]) -> None:
    clf = _classifier(bundles["bert"])
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    with pytest.raises(ContextLengthError, match=r"input 1 has \d+ tokens.*64"):
        list(clf.classify(["short", long_text]))
    with pytest.warns(TruncationWarning, match="input 1"):
        results = list(clf.classify(["short", long_text], truncation="warn", top_k=3))
    assert [r.truncated for r in results] == [False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silent = clf.classify(long_text, truncation="silent", top_k=3)
    assert silent.scores == results[1].scores
    # the cut is transformers' truncation=True to the model's length
    expected = _torch_logits(sources["bert"], [long_text], truncation=True, max_length=64)
    np.testing.assert_allclose(clf.logits([long_text], truncation="silent"), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\], got 1.5"),
        ({"truncation": "cut"}, r"truncation must be one of \['error', 'warn', 'silent'\]"),
    ],
)
def test_bad_options_are_typed_errors(
    bundles: dict[str, Path], kwargs: dict[str, Any], message: str
) -> None:
    clf = _classifier(bundles["bert"])
    with pytest.raises(InvalidArgumentError, match=message):
        clf.classify(["a", "b"], **kwargs)  # raised before iterating


def test_bad_inputs_are_typed_errors(bundles: dict[str, Path]) -> None:
    clf = _classifier(bundles["bert"])
    with pytest.raises(InvalidArgumentError, match="input 1 is a int"):
        list(clf.classify(["fine", 3]))  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="exactly two strings"):
        list(clf.classify([("a", "b", "c")]))  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="bare 2-tuple"):
        clf.classify(("question", "answer"))


def test_export_refuses_over_tolerance(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with pytest.raises(ValidationError, match="tolerance 0"):
        export_encoder(str(sources["bert"]), out, options=EncoderExportOptions(tolerance=0.0))
    assert not out.exists()


def test_detect_task(sources: dict[str, Path], tmp_path: Path) -> None:
    assert detect_task(str(sources["roberta"])) == "text-classification"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert detect_task(str(tmp_path)) == "text-generation"
    assert detect_task("org/name") is None


def test_export_cli_detects_the_task(sources: dict[str, Path], tmp_path: Path) -> None:
    from edge_slm_export.cli import main

    assert main([str(sources["distilbert"]), str(tmp_path / "b")]) == 0
    assert isinstance(edge_slm.load(tmp_path / "b"), TextClassifier)


def test_batches_group_inputs_of_similar_length(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    clf = _classifier(bundles["bert"])
    short, long = "good", "the museum opens at nine on sunday morning near the station"
    widths: list[tuple[int, int]] = []
    run = clf.model.run
    monkeypatch.setattr(
        clf.model, "run", lambda batch: widths.append(batch.input_ids.shape) or run(batch)
    )
    results = list(clf.classify([short, long, short, long], batch_size=2, top_k=3))
    assert widths[0][1] < widths[1][1] and [w[0] for w in widths] == [2, 2]
    assert [r.scores for r in results[::2]] == [results[0].scores] * 2  # input order kept
    assert results[1].scores == results[3].scores != results[0].scores


def test_batch_size_has_an_upper_bound(bundles: dict[str, Path]) -> None:
    from edge_slm.encoders.encoder import MAX_BATCH_SIZE

    clf = edge_slm.load(bundles["bert"])
    assert isinstance(clf, edge_slm.TextClassifier)
    with pytest.raises(edge_slm.InvalidArgumentError, match=rf"\[1, {MAX_BATCH_SIZE}\]"):
        list(clf.classify(["a", "b"], batch_size=MAX_BATCH_SIZE + 1))
