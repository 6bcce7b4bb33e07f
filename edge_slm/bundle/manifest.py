"""The bundle: one folder that carries a model from the build stage to the device.

A bundle holds ``model.onnx`` (plus external-data files if the graph needed them),
``tokenizer.json`` and ``manifest.json``. The manifest is the single source of truth
for the runtime: task, KV-cache layout, I/O names, special tokens, chat template,
generation defaults, checksums, provenance, quantization and quality figures. Every
field is documented in ``docs/bundle-format.md``.

The build stage writes bundles through :func:`write_manifest`; the runtime reads them
through :func:`read_bundle`, which rejects unknown format versions and checksum
mismatches with typed errors before any file is handed to onnxruntime. A bundle is
data only: nothing in it is executed or unpickled.
"""

from __future__ import annotations

import re
import string
import types
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Union, cast, get_args, get_origin, get_type_hints

from edge_slm.bundle import limits
from edge_slm.errors import BundleError, BundleVersionError

FORMAT_NAME = "edge-slm-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TASKS = ("text-generation", "text-classification", "token-classification", "feature-extraction")
Task = Literal[
    "text-generation", "text-classification", "token-classification", "feature-extraction"
]
ProblemType = Literal["single_label_classification", "multi_label_classification"]


def _from_dict(cls: type[Any], data: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown and missing keys."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest field {where!r} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BundleError(
            f"manifest field {where!r} has unknown keys {unknown}; allowed: {sorted(names)}"
        )
    hints = _hints(cls)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise BundleError(
                f"manifest field {where}.{name} must be {_describe(hints[name])}, "
                f"got {_show(value)}"
            )
    try:
        return cls(**data)
    except TypeError as exc:
        raise BundleError(f"manifest field {where!r} is incomplete: {exc}") from None


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value matches a manifest field's annotation (no coercion)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(tp))
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = get_args(tp)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = get_args(tp)
        return isinstance(value, dict) and all(
            _fits(k, key) and _fits(v, item) for k, v in value.items()
        )
    # A nested section: already built (or checked) by its own _from_dict.
    return isinstance(value, (dict, tp)) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_file_name(name: Any, where: str, nested: bool = False) -> str:
    """A bundle file name, refused (BundleError) unless it stays inside the folder.

    Plain names only (letters, digits, ``.``, ``_``, ``-``; not ``.`` or ``..``); with
    ``nested``, ``/``-separated plain parts (a checksum entry of a sub-folder file).
    Never absolute, never ``..``, never a backslash, a drive or a NUL byte.
    """
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: file name must be a non-empty string, got {_show(name)}")
    if len(name) > limits.MAX_NAME_LENGTH:
        raise BundleError(f"{where}: file name is longer than {limits.MAX_NAME_LENGTH}")
    parts = name.split("/") if nested else [name]
    for part in parts:
        if part in ("", ".", "..") or not _PLAIN_NAME.fullmatch(part):
            sep = "'/'-separated parts of " if nested else ""
            raise BundleError(
                f"{where}: file name {_show(name)} is not allowed: only plain names "
                f"inside the bundle ({sep}letters, digits, '.', '_', '-'; no '..', "
                "no absolute path, no other path separator)"
            )
    return name


def _check_template(template: Any, where: str, placeholder: bool) -> None:
    """A graph I/O name; with ``placeholder``, a template holding ``{layer}`` and no
    other replacement field, conversion or format spec (no width that allocates)."""
    if not isinstance(template, str) or not template:
        raise BundleError(f"manifest field {where} must be a non-empty string")
    if len(template) > limits.MAX_NAME_LENGTH:
        raise BundleError(f"manifest field {where} is longer than {limits.MAX_NAME_LENGTH}")
    if not placeholder:
        return
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise BundleError(f"manifest field {where} {template!r} is not a template: {exc}") from None
    found = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    if not found or any(f != ("layer", "", None) for f in found):
        raise BundleError(
            f"manifest field {where} {template!r} must hold '{{layer}}' and no other "
            "replacement field, conversion or format spec"
        )


@dataclass(frozen=True)
class DecoderIO:
    """Names and shapes the KV-cache loop needs to drive a decoder graph.

    Name templates contain ``{layer}``, e.g. ``past_key_values.{layer}.key``.
    ``position_ids`` is None for graphs that compute positions themselves.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str = "float32"
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str | None = "position_ids"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    logits: str = "logits"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    # Graph layout. "optimum": past/present are separate tensors of the past length and
    # the total length, the graph takes an attention mask. "gqa-shared": the fused graph
    # of export/fused.py (GroupQueryAttention); past and present are one buffer of
    # shape [batch, kv_heads, capacity, head_dim], written in place, driven by the
    # inputs named below; attention_mask and position_ids are not graph inputs.
    layout: str = "optimum"
    max_length: int | None = None
    seqlens_k: str | None = None
    total_sequence_length: str | None = None
    logits_positions: str | None = None

    def past_names(self) -> list[tuple[str, str]]:
        """(key, value) input names per layer, in layer order."""
        return [
            (self.past_key.format(layer=i), self.past_value.format(layer=i))
            for i in range(self.num_layers)
        ]

    def present_names(self) -> list[tuple[str, str]]:
        """(key, value) output names per layer, in layer order."""
        return [
            (self.present_key.format(layer=i), self.present_value.format(layer=i))
            for i in range(self.num_layers)
        ]


@dataclass(frozen=True)
class EncoderIO:
    """Input/output names of an encoder graph (classification, embeddings).

    ``problem_type`` tells a classifier's runtime how to turn logits into scores
    (softmax for single-label, sigmoid for multi-label). ``pooling`` and ``normalize``
    describe what the graph already does after the encoder (sentence-transformers
    pooling, L2 normalisation); the runtime does not apply them again.
    """

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    token_type_ids: str | None = None
    output: str = "logits"
    problem_type: ProblemType | None = None
    pooling: Literal["mean", "cls"] | None = None
    normalize: bool = False
    hidden_size: int | None = None


@dataclass(frozen=True)
class SpecialTokens:
    """Special token ids and strings; ``eos_token_ids`` may hold several ids."""

    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings from the model's generation_config; None means "not set"."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class Provenance:
    """Where a bundle came from and which tools made it."""

    source: str
    source_kind: Literal["hub", "folder", "gguf", "onnx"]
    revision: str | None = None
    source_sha256: str | None = None
    created_at: str | None = None
    tools: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Validation:
    """Export-time check of the ONNX graph against the torch model."""

    max_abs_logit_diff: float
    tolerance: float
    prompts: int
    greedy_tokens_match: bool | None = None


@dataclass(frozen=True)
class Quantization:
    """How the weights were made small, and what it cost in quality.

    ``method`` is "none" for an fp32 bundle. Perplexities (decoders) or accuracies
    (classifiers, over ``eval_examples`` labelled examples) are measured on the same
    file (named by ``eval_text`` and its sha256) before and after quantization.
    """

    method: str = "none"
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    size_before_bytes: int | None = None
    size_after_bytes: int | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    eval_text: str | None = None
    eval_text_sha256: str | None = None
    eval_tokens: int | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    eval_examples: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Training:
    """How a classification head was fitted on the device (:mod:`edge_slm.encoders.train_head`).

    ``holdout_accuracy`` is measured through the written bundle on ``holdout_examples``
    examples kept out of the fit (None when nothing was held out); ``examples_per_label``
    counts the examples the head was fitted on.
    """

    method: str
    embedder: str
    examples: int
    examples_per_label: dict[str, int]
    holdout_examples: int
    holdout_accuracy: float | None
    C: float
    class_weight: str | dict[str, float] | None
    seed: int
    iterations: int
    converged: bool
    embed_seconds: float
    fit_seconds: float
    data_sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to run a bundle (see docs/bundle-format.md)."""

    task: Task
    model_type: str
    architecture: str
    vocab_size: int
    context_length: int
    files: dict[str, str]
    special_tokens: SpecialTokens
    provenance: Provenance
    decoder: DecoderIO | None = None
    encoder: EncoderIO | None = None
    chat_template: str | None = None
    chat_format: dict[str, Any] | None = None
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    labels: list[str] | None = None
    validation: Validation | None = None
    quantization: Quantization = field(default_factory=Quantization)
    training: Training | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the format header first."""
        data = asdict(self)
        head = {"format": data.pop("format"), "format_version": data.pop("format_version")}
        return {**head, **data}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse and validate a manifest dict; raises BundleError / BundleVersionError."""
        if not isinstance(data, dict):
            raise BundleError("manifest must be a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise BundleError(
                f"not an edge-slm manifest: format is {data.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleVersionError(
                f"bundle format_version {version!r} is not supported by this runtime "
                f"(supported: {FORMAT_VERSION}); re-export the bundle or upgrade edge-slm"
            )
        data = dict(data)
        nested: dict[str, type[Any]] = {
            "special_tokens": SpecialTokens,
            "provenance": Provenance,
            "decoder": DecoderIO,
            "encoder": EncoderIO,
            "generation_defaults": GenerationDefaults,
            "validation": Validation,
            "quantization": Quantization,
            "training": Training,
        }
        for key, sub in nested.items():
            if data.get(key) is not None:
                data[key] = _from_dict(sub, data[key], key)
        manifest = cast(Manifest, _from_dict(cls, data, "manifest"))
        manifest._check()
        return manifest

    def _check(self) -> None:
        if self.task not in TASKS:
            raise BundleError(f"unknown task {self.task!r}; allowed: {list(TASKS)}")
        for role in ("model", "tokenizer"):
            if role not in self.files:
                raise BundleError(f"manifest 'files' lacks the {role!r} entry")
        if self.task == "text-generation" and self.decoder is None:
            raise BundleError("a text-generation bundle needs a 'decoder' section")
        if self.task != "text-generation" and self.encoder is None:
            raise BundleError(f"a {self.task} bundle needs an 'encoder' section")
        if self.task in ("text-classification", "token-classification") and not self.labels:
            raise BundleError(f"a {self.task} bundle needs 'labels'")
        if self.context_length <= 0 or self.vocab_size <= 0:
            raise BundleError("context_length and vocab_size must be positive")
        self._check_limits()
        self._check_names()

    def _check_limits(self) -> None:
        """Declared sizes within :mod:`edge_slm.bundle.limits` (before any allocation)."""

        def bound(where: str, value: int | None, high: int, low: int = 1) -> None:
            if value is not None and not low <= value <= high:
                raise BundleError(
                    f"manifest field {where} = {value} is outside [{low}, {high}] "
                    "(edge_slm.bundle.limits)"
                )

        bound("context_length", self.context_length, limits.MAX_CONTEXT_LENGTH)
        bound("vocab_size", self.vocab_size, limits.MAX_VOCAB_SIZE)
        if self.decoder is not None:
            bound("decoder.num_layers", self.decoder.num_layers, limits.MAX_LAYERS)
            bound("decoder.num_kv_heads", self.decoder.num_kv_heads, limits.MAX_KV_HEADS)
            bound("decoder.head_dim", self.decoder.head_dim, limits.MAX_HEAD_DIM)
            bound("decoder.max_length", self.decoder.max_length, limits.MAX_CONTEXT_LENGTH)
        if self.encoder is not None:
            bound("encoder.hidden_size", self.encoder.hidden_size, limits.MAX_HIDDEN_SIZE)
        if self.labels is not None:
            bound("labels (count)", len(self.labels), limits.MAX_LABELS, 0)
        bound(
            "special_tokens.eos_token_ids (count)",
            len(self.special_tokens.eos_token_ids),
            limits.MAX_EOS_IDS,
            0,
        )
        for tid in [
            self.special_tokens.bos_token_id,
            self.special_tokens.pad_token_id,
            *self.special_tokens.eos_token_ids,
        ]:
            bound("special_tokens id", tid, self.vocab_size - 1, 0)
        for key in ("chat_template",):
            text = getattr(self, key)
            if text is not None and len(text) > limits.MAX_CHAT_TEMPLATE_CHARS:
                raise BundleError(
                    f"manifest field {key} is longer than {limits.MAX_CHAT_TEMPLATE_CHARS} chars"
                )

    def _check_names(self) -> None:
        """File names stay inside the bundle; I/O names are bounded, templates plain."""
        for role, name in self.files.items():
            check_file_name(name, f"manifest files.{role}")
        if self.decoder is not None:
            io = self.decoder
            for key in ("past_key", "past_value", "present_key", "present_value"):
                _check_template(getattr(io, key), f"decoder.{key}", placeholder=True)
            for key in ("input_ids", "attention_mask", "logits"):
                _check_template(getattr(io, key), f"decoder.{key}", placeholder=False)
            for key in ("position_ids", "seqlens_k", "total_sequence_length", "logits_positions"):
                if getattr(io, key) is not None:
                    _check_template(getattr(io, key), f"decoder.{key}", placeholder=False)
            if (
                len({io.past_key, io.past_value}) != 2
                or len({io.present_key, io.present_value}) != 2
            ):
                raise BundleError("decoder key and value name templates must differ")
        if self.encoder is not None:
            io_e = self.encoder
            for key in ("input_ids", "attention_mask", "output"):
                _check_template(getattr(io_e, key), f"encoder.{key}", placeholder=False)
            if io_e.token_type_ids is not None:
                _check_template(io_e.token_type_ids, "encoder.token_type_ids", placeholder=False)
