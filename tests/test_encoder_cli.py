"""``edge-slm classify`` / ``edge-slm embed``: arguments and files in, JSONL out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_encoders import build_classifier, build_sentence_transformer

import edge_slm
from edge_slm import TextClassifier, TextEmbedder
from edge_slm.cli.main import main
from edge_slm_export.encoder import export_encoder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-enc")
    return {
        "classifier": export_encoder(str(build_classifier("bert", root / "c")), root / "clf"),
        "embedder": export_encoder(str(build_sentence_transformer(root / "e")), root / "emb"),
    }


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_classify_texts_from_arguments(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["classify", str(bundles["classifier"]), "great film", "awful", "--top-k", "2"]) == 0
    )
    lines = _lines(capsys.readouterr().out)
    clf = edge_slm.load(bundles["classifier"])
    assert isinstance(clf, TextClassifier)
    expected = [r.to_dict() for r in clf.classify(["great film", "awful"], top_k=2)]
    assert [{k: v for k, v in line.items() if k != "text"} for line in lines] == expected
    assert [line["text"] for line in lines] == ["great film", "awful"]


def test_classify_csv_to_jsonl_keeps_columns_and_reports_progress(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.csv"
    rows = [(str(i), f"message {i} about the station") for i in range(45)]
    source.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code = main(
        ["classify", str(bundles["classifier"]), "--input", str(source), "--output", str(out)]
    )
    assert code == 0
    lines = _lines(out.read_text(encoding="utf-8"))
    assert [(line["id"], line["text"]) for line in lines] == rows
    assert all(line["label"] in ("negative", "neutral", "positive") for line in lines)
    assert "45 texts" in capsys.readouterr().err


def test_classify_jsonl_pairs(bundles: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"text": "How do I pay?", "text_pair": "With a card."}) + "\n", encoding="utf-8"
    )
    out = tmp_path / "out.jsonl"
    assert (
        main(["classify", str(bundles["classifier"]), "--input", str(source), "--output", str(out)])
        == 0
    )
    (line,) = _lines(out.read_text(encoding="utf-8"))
    clf = edge_slm.load(bundles["classifier"])
    assert isinstance(clf, TextClassifier)
    (expected,) = clf.classify([("How do I pay?", "With a card.")])
    assert line["label"] == expected.label and line["score"] == pytest.approx(expected.score)


def test_embed_from_a_text_file(bundles: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "faq.txt"
    source.write_text("opening hours\n\nwhere are the toilets\n", encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    assert (
        main(["embed", str(bundles["embedder"]), "--input", str(source), "--output", str(out)]) == 0
    )
    lines = _lines(out.read_text(encoding="utf-8"))
    assert [line["text"] for line in lines] == ["opening hours", "where are the toilets"]
    emb = edge_slm.load(bundles["embedder"])
    assert isinstance(emb, TextEmbedder)
    np.testing.assert_allclose(lines[0]["embedding"], emb.embed("opening hours"), atol=1e-6)


def test_errors_are_reported_with_exit_code_2(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", str(bundles["classifier"]), "x"]) == 2
    assert "needs a feature-extraction" in capsys.readouterr().err
    assert main(["classify", str(bundles["classifier"])]) == 2
    assert "no texts" in capsys.readouterr().err
    long_text = "station " * 200
    assert main(["classify", str(bundles["classifier"]), long_text]) == 2
    assert "context length" in capsys.readouterr().err


def test_input_file_errors_name_the_problem(bundles: dict[str, Path], tmp_path: Path) -> None:
    from edge_slm.errors import InvalidArgumentError
    from edge_slm.text.records import read_records

    no_text = tmp_path / "bad.csv"
    no_text.write_text("sentence,label\nhello,1\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match="must name a 'text' column"):
        list(read_records(no_text))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match=r"bad.jsonl:2: not JSON"):
        list(read_records(bad_json))
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        list(read_records(tmp_path / "missing.txt"))
