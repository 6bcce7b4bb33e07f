"""Classification and embeddings run with torch, transformers, optimum, scikit-learn,
joblib and the build stage made unimportable, in a fresh interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
from isolation import report_of, run_blocked
from tiny_encoders import build_classifier, build_sentence_transformer

BLOCKED = (
    "torch",
    "transformers",
    "optimum",
    "edge_slm_export",
    "edge_slm_quantize",
    "jinja2",
    "sklearn",
    "joblib",
)

CLASSIFY_AND_EMBED = """
import edge_slm
clf = edge_slm.load(CLASSIFIER)
REPORT["labels"] = [
    r.label for r in clf.classify(["good", ("a question", "an answer")], batch_size=2)
]
emb = edge_slm.load(EMBEDDER)
index = edge_slm.CosineIndex.build(emb, ["opening hours", "toilets"])
REPORT["hit"] = index.search("opening hours", k=1)[0].text
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edge_slm_export.encoder import export_encoder

    root = tmp_path_factory.mktemp("iso")
    return {
        "classifier": export_encoder(
            str(build_classifier("bert", root / "c-src")), root / "classifier"
        ),
        "embedder": export_encoder(
            str(build_sentence_transformer(root / "e-src")), root / "embedder"
        ),
    }


def test_classify_and_embed_without_the_build_stage(bundles: dict[str, Path]) -> None:
    out = run_blocked(
        CLASSIFY_AND_EMBED,
        BLOCKED,
        cwd=bundles["classifier"],
        CLASSIFIER=str(bundles["classifier"]),
        EMBEDDER=str(bundles["embedder"]),
    )
    report = report_of(out)
    assert len(report["labels"]) == 2 and all(report["labels"])
    assert report["hit"] == "opening hours"
    assert report["heavy"] == []


def test_blocking_really_blocks() -> None:
    out = run_blocked("import sklearn", BLOCKED)
    assert out.returncode != 0 and "sklearn is blocked" in out.stderr
