"""Classification and embeddings run with torch, transformers, optimum, scikit-learn,
joblib and the build stage made unimportable, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_encoders import build_classifier, build_sentence_transformer

BLOCKED = (
    "torch",
    "transformers",
    "optimum",
    "export",
    "quantize",
    "jinja2",
    "sklearn",
    "joblib",
)

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import edge_slm
    clf = edge_slm.load(CLASSIFIER)
    labels = [r.label for r in clf.classify(["good", ("a question", "an answer")], batch_size=2)]
    emb = edge_slm.load(EMBEDDER)
    index = edge_slm.CosineIndex.build(emb, ["opening hours", "toilets"])
    hit = index.search("opening hours", k=1)[0].text
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"labels": labels, "hit": hit, "heavy": heavy}))
    """
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from export.encoder import export_encoder

    root = tmp_path_factory.mktemp("iso")
    return {
        "classifier": export_encoder(
            str(build_classifier("bert", root / "c-src")), root / "classifier"
        ),
        "embedder": export_encoder(
            str(build_sentence_transformer(root / "e-src")), root / "embedder"
        ),
    }


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def test_classify_and_embed_without_the_build_stage(bundles: dict[str, Path]) -> None:
    code = (
        f"BLOCKED = {BLOCKED!r}\nCLASSIFIER = {str(bundles['classifier'])!r}\n"
        f"EMBEDDER = {str(bundles['embedder'])!r}\n{SCRIPT}"
    )
    # From the bundle's folder, so the repository's export/ and quantize/ are not on the path.
    out = _run(code, bundles["classifier"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["labels"]) == 2 and all(report["labels"])
    assert report["hit"] == "opening hours"
    assert report["heavy"] == []


def test_blocking_really_blocks(bundles: dict[str, Path]) -> None:
    code = f"BLOCKED = {BLOCKED!r}\nCLASSIFIER = EMBEDDER = ''\n" + SCRIPT.replace(
        "import edge_slm", "import sklearn"
    )
    out = _run(code, bundles["classifier"])
    assert out.returncode != 0 and "sklearn is blocked" in out.stderr
