"""Export a Hugging Face encoder (BERT, DistilBERT, RoBERTa: :mod:`edge_slm_export.architectures`) to a bundle.

Three tasks:

* ``text-classification``: a ``*ForSequenceClassification`` model; the graph outputs
  ``logits [batch, labels]``; the manifest carries the labels (``id2label``) and the
  ``problem_type`` (softmax for single-label, sigmoid for multi-label).
* ``token-classification``: a ``*ForTokenClassification`` model (NER, tagging); the
  graph outputs ``logits [batch, seq, labels]``; the manifest carries the labels.
* ``feature-extraction``: a bare encoder (e.g. a sentence-transformers folder); the
  graph outputs ``sentence_embedding [batch, dim]`` with the source's pooling (mean or
  CLS, from ``1_Pooling/config.json``, mean if absent) and L2 normalisation (when
  ``modules.json`` lists a Normalize module) appended to the graph (see
  :mod:`edge_slm_export.pooling` for why in the graph).

The graph is exported by optimum-onnx and validated through the runtime's own code path
against transformers; a difference over the tolerance raises ValidationError and leaves
no bundle behind.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from edge_slm.bundle import EncoderIO, Manifest, Provenance, SpecialTokens, write_manifest
from edge_slm.cli.progress import Reporter, silent_reporter, step
from edge_slm.encoders.encoder import EncoderModel
from edge_slm_export.architectures import encoder_architecture
from edge_slm_export.decoder import prepare_output, tool_versions
from edge_slm_export.errors import ExportError, UnsupportedModelError
from edge_slm_export.pooling import LinearHead, Pooling, add_pooling
from edge_slm_export.source import (
    LoadedSource,
    _folder_sha256,
    load_source,
    refusal,
    source_kind,
    weights_policy,
)
from edge_slm_export.validate_encoder import validate_encoder

ENCODER_TASKS = ("text-classification", "token-classification", "feature-extraction")
EncoderTask = Literal["text-classification", "token-classification", "feature-extraction"]
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class EncoderExportOptions:
    """Knobs of :func:`export_encoder`; None means "what the source says".

    Attributes:
        tolerance: max |ONNX - torch| over the validation texts.
        opset: ONNX opset (default: optimum's).
        overwrite: replace a non-empty output folder.
        pooling: override the sentence-transformers pooling ("mean" or "cls").
        normalize: override the sentence-transformers normalisation.
        max_length: cap the context length (tokens per input).
        allow_pickle: load pickle checkpoints (.bin) too; off: safetensors only.
    """

    tolerance: float = DEFAULT_TOLERANCE
    opset: int | None = None
    overwrite: bool = False
    pooling: Pooling | None = None
    normalize: bool | None = None
    max_length: int | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class SentenceTransformerSettings:
    """What a sentence-transformers folder says about pooling, normalisation, length."""

    pooling: Pooling = "mean"
    normalize: bool = False
    max_seq_length: int | None = None


def detect_task(source: str) -> str | None:
    """The task a local source is for, from its files; None when it cannot be told.

    ``.gguf`` files and ``*ForCausalLM`` / ``*LMHeadModel`` architectures are
    text-generation; ``*ForSequenceClassification`` is text-classification,
    ``*ForTokenClassification`` token-classification; a folder
    with ``modules.json`` (sentence-transformers) or a bare ``*Model`` is
    feature-extraction.
    """
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        return "text-generation"
    if not (path / "config.json").is_file():
        return None
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return "token-classification"
    if (path / "modules.json").is_file():
        return "feature-extraction"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "text-generation"
    if any(a.endswith("Model") for a in architectures):
        return "feature-extraction"
    return None


def sentence_transformer_settings(folder: Path) -> SentenceTransformerSettings:
    """Read ``modules.json``, ``1_Pooling/config.json`` and ``sentence_bert_config.json``.

    Raises:
        UnsupportedModelError: the pooling is not mean or CLS (max, weighted, ...).
    """
    pooling: Pooling = "mean"
    normalize = False
    modules_file = folder / "modules.json"
    pooling_dir = folder / "1_Pooling"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                pooling_dir = folder / m.get("path", "1_Pooling")
    config_file = pooling_dir / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        modes = sorted(
            key.removeprefix("pooling_mode_")
            for key, on in config.items()
            if key.startswith("pooling_mode_") and on is True
        )
        if modes == ["mean_tokens"]:
            pooling = "mean"
        elif modes == ["cls_token"]:
            pooling = "cls"
        else:
            raise UnsupportedModelError(
                f"{config_file}: pooling modes {modes} are not supported; allowed: "
                "exactly one of ['mean_tokens', 'cls_token']"
            )
    max_seq = None
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
    return SentenceTransformerSettings(pooling, normalize, int(max_seq) if max_seq else None)


def _load_bare_encoder(source: str, allow_pickle: bool, tokens: bool = False) -> LoadedSource:
    """Load a bare encoder (AutoModel), or a token classifier (AutoModelForTokenClassification)
    when ``tokens``, in float32 from a folder or hub id."""
    import torch
    from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

    auto = AutoModelForTokenClassification if tokens else AutoModel

    kind = source_kind(source)
    if kind == "gguf":
        raise UnsupportedModelError(f"{source!r}: encoders cannot be exported from GGUF files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = auto.from_pretrained(source, dtype=torch.float32, **weights_policy(allow_pickle))
    except (OSError, ValueError, KeyError) as exc:
        refused = refusal(source, exc, allow_pickle)
        if refused is not None:
            raise refused from None
        raise ExportError(f"cannot load {source!r}: {exc}") from exc
    model.eval()
    if kind == "folder":
        hf_dir = Path(source).resolve()
        return LoadedSource(source, kind, hf_dir, model, tokenizer, None, _folder_sha256(hf_dir))
    from edge_slm_export.source import _hub_snapshot

    hf_dir = _hub_snapshot(source)
    return LoadedSource(
        source, kind, hf_dir, model, tokenizer, getattr(model.config, "_commit_hash", None), None
    )


def onnx_export(hf_dir: Path, out: Path, task: EncoderTask, opset: int | None) -> Path:
    """Run optimum's exporter on a transformers encoder (never the sentence-transformers path)."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(hf_dir),
        output=out,
        task=task,
        opset=opset,
        do_validation=False,  # validated below through the runtime's own code path
        library_name="transformers",
    )
    model = out / "model.onnx"
    if not model.is_file():
        raise ExportError(f"optimum wrote no model.onnx in {out}")
    return model


def context_length(config: Any, tokenizer: Any, cap: int | None) -> int:
    """Tokens per input the model accepts: positions, tokenizer and caller limits."""
    positions = int(config.max_position_embeddings)
    positions -= encoder_architecture(config.model_type).position_offset(config)
    limits = [positions]
    if 0 < int(getattr(tokenizer, "model_max_length", 0) or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    if cap:
        limits.append(int(cap))
    return min(limits)


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """Padding id/string (what dynamic padding fills with) and the CLS/SEP strings."""
    return SpecialTokens(
        bos_token_id=tokenizer.cls_token_id,
        eos_token_ids=[tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else [],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        bos_token=tokenizer.cls_token,
        eos_token=tokenizer.sep_token,
        pad_token=tokenizer.pad_token,
    )


def encoder_io(graph_inputs: set[str], output: str, **extra: Any) -> EncoderIO:
    """I/O names of the exported graph (token_type_ids only when the graph takes it)."""
    return EncoderIO(
        token_type_ids="token_type_ids" if "token_type_ids" in graph_inputs else None,
        output=output,
        **extra,
    )


def _torch_forward(model: Any) -> Callable[[Any, Any], np.ndarray]:
    """A forward that passes only the inputs ``model`` accepts (DistilBERT: no token types)."""
    accepted = set(inspect.signature(model.forward).parameters)

    def forward(m: Any, encoding: Any) -> np.ndarray:
        out = m(**{k: v for k, v in encoding.items() if k in accepted})
        return cast(np.ndarray, out.logits.float().numpy())

    return forward


def torch_pool(hidden: Any, mask: Any, pooling: Pooling, normalize: bool) -> Any:
    """sentence-transformers' pooling and normalisation, in torch (the reference)."""
    import torch

    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


def export_encoder(
    source: str,
    out_dir: str | Path,
    task: EncoderTask | None = None,
    options: EncoderExportOptions | None = None,
    report: Reporter = silent_reporter,
    head: LinearHead | None = None,
) -> Path:
    """Export ``source`` (HF folder or hub id) as a classification or embedding bundle.

    Args:
        source: a local HF folder or a hub id.
        out_dir: the bundle folder to write.
        task: "text-classification", "token-classification" or "feature-extraction";
            None detects it from the
            folder (:func:`detect_task`).
        options: tolerance, opset, pooling/normalisation overrides, length cap.
        head: a linear classifier over the pooled (normalised) embedding of a bare
            encoder (a SetFit-style model); the bundle is then a text-classification
            bundle whose graph is encoder + pooling + normalisation + MatMul + Add.

    Returns:
        The bundle folder.

    Raises:
        UnsupportedModelError: not an encoder family in edge_slm_export.architectures, or an
            unsupported pooling.
        ValidationError: the ONNX outputs differ from torch beyond ``options.tolerance``.
    """
    options = options or EncoderExportOptions()
    if head is not None:
        task = "text-classification"
    if task is None:
        detected = detect_task(source)
        if detected not in ENCODER_TASKS:
            raise ExportError(
                f"cannot tell the task of {source!r} (detected {detected!r}); pass task= one "
                f"of {list(ENCODER_TASKS)}"
            )
        task = cast(EncoderTask, detected)
    if task not in ENCODER_TASKS:
        raise ExportError(f"task must be one of {list(ENCODER_TASKS)}, got {task!r}")
    out_dir = Path(out_dir)
    prepare_output(out_dir, options.overwrite)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-slm-export-") as tmp:
            work = Path(tmp)
            with step(report, f"loading {source}"):
                if task == "text-classification" and head is None:
                    loaded = load_source(source, work, "text-classification", options.allow_pickle)
                else:
                    tokens = task == "token-classification"
                    loaded = _load_bare_encoder(source, options.allow_pickle, tokens)
            encoder_architecture(loaded.model.config.model_type)  # refuses unknown families
            graph_task: EncoderTask = "feature-extraction" if head is not None else task
            with step(report, "exporting to ONNX"):
                onnx_path = onnx_export(loaded.hf_dir, work / "onnx", graph_task, options.opset)
            _assemble(loaded, onnx_path, out_dir, task, options, report, head)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def _assemble(
    loaded: LoadedSource,
    onnx_path: Path,
    out_dir: Path,
    task: EncoderTask,
    options: EncoderExportOptions,
    report: Reporter,
    head: LinearHead | None = None,
) -> None:
    """Write graph (with pooling for embeddings) and tokenizer, validate, write the manifest."""
    import onnx

    config = loaded.model.config
    graph = onnx.load(str(onnx_path))
    inputs = {i.name for i in graph.graph.input}
    settings = sentence_transformer_settings(loaded.hf_dir)
    labels: list[str] | None = None
    if task == "text-classification" and head is None:
        io = encoder_io(
            inputs,
            "logits",
            problem_type=(
                "multi_label_classification"
                if config.problem_type == "multi_label_classification"
                else "single_label_classification"
            ),
        )
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        forward = _torch_forward(loaded.model)
        cap = options.max_length
    elif task == "token-classification":
        io = encoder_io(inputs, "logits")
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        forward = _torch_forward(loaded.model)
        cap = options.max_length
    else:
        pooling = options.pooling or settings.pooling
        normalize = settings.normalize if options.normalize is None else options.normalize
        output = add_pooling(graph, "last_hidden_state", "attention_mask", pooling, normalize, head)
        io = encoder_io(
            inputs,
            output,
            pooling=pooling,
            normalize=normalize,
            hidden_size=config.hidden_size,
            problem_type="single_label_classification" if head is not None else None,
        )
        if head is not None:
            labels = list(head.labels)
        accepted = set(inspect.signature(loaded.model.forward).parameters)

        def forward(m: Any, encoding: Any) -> np.ndarray:
            hidden = m(**{k: v for k, v in encoding.items() if k in accepted}).last_hidden_state
            pooled = torch_pool(hidden, encoding["attention_mask"], pooling, normalize)
            out = pooled.double().numpy()
            if head is not None:
                out = out @ head.weight.T.astype(np.float64) + head.bias.astype(np.float64)
            return cast(np.ndarray, out.astype(np.float32))

        caps = [c for c in (options.max_length, settings.max_seq_length) if c]
        cap = min(caps) if caps else None
    onnx.save(graph, str(out_dir / "model.onnx"))
    loaded.tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    manifest = Manifest(
        task=task,
        model_type=config.model_type,
        architecture=(config.architectures or [type(loaded.model).__name__])[0],
        vocab_size=int(config.vocab_size),
        context_length=context_length(config, loaded.tokenizer, cap),
        files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
        special_tokens=special_tokens(loaded.tokenizer),
        provenance=Provenance(
            source=loaded.source,
            source_kind=loaded.kind,
            revision=loaded.revision,
            source_sha256=loaded.source_sha256,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tools=tool_versions(),
        ),
        encoder=io,
        labels=labels,
    )
    with step(report, "validating ONNX against torch"):
        runtime = EncoderModel(out_dir, manifest)
        validation = validate_encoder(
            runtime, loaded.model, loaded.tokenizer, forward, options.tolerance
        )
    report(f"  max |output difference| = {validation.max_abs_logit_diff:.2e}")
    write_manifest(out_dir, replace(manifest, validation=validation))
