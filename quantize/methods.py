"""The registry of quantization methods: a name on the CLI and in the manifest -> how.

A method pairs default settings with the function that applies them to a graph, so a
new method (e.g. mixed precision per tensor, a quantized embedding) is one more entry
here and needs no change in :mod:`edge_slm_quantize.bundle` or the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import onnx

from edge_slm.bundle import Manifest, sha256_file
from edge_slm_quantize.errors import QuantizationError, UnknownMethodError
from edge_slm_quantize.weight_only import WeightOnlySettings, quantize_weights


class QuantizedGraph(Protocol):
    """What a method returns: the new graph and JSON-ready facts for the manifest."""

    model: onnx.ModelProto

    def details(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MethodContext:
    """What a method may need beyond the graph: the source bundle and its manifest.

    Attributes:
        bundle: the fp32 source bundle folder.
        manifest: its manifest (provenance names the export source).
        gguf_path: where the GGUF file the bundle was exported from lives now, when it
            moved since the export (None: the path recorded in the provenance).
    """

    bundle: Path
    manifest: Manifest
    gguf_path: Path | None = None


# (graph with weights loaded, settings, logits output name, context) -> quantized graph
Apply = Callable[[onnx.ModelProto, WeightOnlySettings, str, MethodContext], QuantizedGraph]


def _weight_only(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    return quantize_weights(model, settings, logits=logits)


class _SharedEmbeddingGraph:
    """A quantized graph whose tied embedding lookup reads the lm_head's blocks."""

    def __init__(self, inner: QuantizedGraph, shared: Any) -> None:
        self.model = inner.model
        self._inner = inner
        self._shared = shared

    def details(self) -> dict[str, Any]:
        details = self._inner.details()
        if self._shared is not None:
            details["embedding"] = (
                f"{self._shared.bits}-bit, shared with the lm_head (GatherBlockQuantized over "
                f"the lm_head's MatMulNBits blocks {self._shared.blocks!r}, block "
                f"{self._shared.block_size}); the fp32 table {self._shared.table!r} was dropped"
            )
            details["tied_lm_head"] = "one quantized copy for lookup and lm_head"
        return details


def _shared(inner: QuantizedGraph, logits: str) -> QuantizedGraph:
    from edge_slm_quantize.shared_embedding import share_tied_embedding

    return _SharedEmbeddingGraph(inner, share_tied_embedding(inner.model, logits))


def _weight_only_shared(lm_head_bits: int | None) -> Apply:
    """Weight-only quantization, the tied embedding shared with the lm_head.

    ``lm_head_bits`` (when it differs from the settings' bits) quantizes the lm_head, and
    with it the shared embedding, at its own bit width.
    """

    def apply(
        model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
    ) -> QuantizedGraph:
        if lm_head_bits is None or lm_head_bits == settings.bits:
            return _shared(quantize_weights(model, settings, logits=logits), logits)
        head = _lm_head_node(model, logits)
        body = quantize_weights(model, settings, logits=logits, exclude=(head,))
        result = quantize_weights(
            body.model, replace(settings, bits=lm_head_bits), logits=logits, only=(head,)
        )
        return _shared(result, logits)

    return apply


def _lm_head_node(model: onnx.ModelProto, logits: str) -> str:
    for node in model.graph.node:
        if logits in node.output and node.op_type == "MatMul":
            return str(node.name)
    raise QuantizationError(f"no MatMul computes {logits!r}: cannot quantize the lm_head apart")


def gguf_source_path(context: MethodContext) -> Path:
    """The GGUF file a bundle was exported from, its sha256 checked against the provenance.

    Raises:
        GGUFError: the bundle did not come from a GGUF file, the file is missing, or its
            contents changed since the export.
    """
    from edge_slm_quantize.gguf import GGUFError

    provenance = context.manifest.provenance
    if provenance.source_kind != "gguf":
        raise GGUFError(
            f"method 'gguf' transcodes the blocks of the GGUF file a bundle was exported from; "
            f"{str(context.bundle)!r} came from a {provenance.source_kind} source "
            f"({provenance.source!r}); use int4 or int8"
        )
    path = context.gguf_path or Path(provenance.source)
    if not path.is_file():
        raise GGUFError(
            f"the GGUF source {str(path)!r} recorded in the bundle's provenance is not there "
            "(pass its new location with --gguf PATH)"
        )
    digest = sha256_file(path)
    if provenance.source_sha256 and digest != provenance.source_sha256:
        raise GGUFError(
            f"{str(path)!r} has sha256 {digest}, but the bundle was exported from a file with "
            f"sha256 {provenance.source_sha256}"
        )
    return path


def _check_fused(context: MethodContext) -> None:
    from edge_slm_quantize.gguf import GGUFError

    decoder = context.manifest.decoder
    if decoder is None or decoder.layout != "gqa-shared":
        layout = decoder.layout if decoder else None
        raise GGUFError(
            f"the gguf methods need the fused graph (layout 'gqa-shared'), got {layout!r}: "
            "export with --graph fused"
        )


def _gguf(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    from edge_slm_quantize.gguf import read_gguf, transcode_gguf

    _check_fused(context)
    source = read_gguf(gguf_source_path(context))
    return _shared(transcode_gguf(model, source, settings, logits=logits), logits)


def _gguf_lm_head4(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    from edge_slm_quantize.gguf import read_gguf, transcode_gguf
    from edge_slm_quantize.search import lm_head_importance

    _check_fused(context)
    source = read_gguf(gguf_source_path(context))
    result = transcode_gguf(
        model,
        source,
        settings,
        logits=logits,
        lm_head=replace(settings, bits=4),
        importance=lm_head_importance(model, logits),
    )
    return _shared(result, logits)


def _searched(lm_head_bits: int | None) -> Apply:
    """Searched-scale block quantization (:mod:`edge_slm_quantize.search`), embedding shared."""

    def apply(
        model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
    ) -> QuantizedGraph:
        from edge_slm_quantize.search import lm_head_importance, quantize_graph

        bits_for = None
        if lm_head_bits is not None and lm_head_bits != settings.bits:
            bits_for = {_lm_head_node(model, logits): lm_head_bits}
        result = quantize_graph(
            model,
            settings,
            logits=logits,
            bits_for=bits_for,
            importance=lm_head_importance(model, logits),
        )
        return _shared(result, logits)

    return apply


@dataclass(frozen=True)
class Method:
    """A registered quantization method: its defaults, a one-line summary, its function."""

    name: str
    defaults: WeightOnlySettings
    summary: str
    apply: Apply
    # The blocks come from elsewhere (a GGUF file): block size and symmetry are not choices.
    fixed_blocks: bool = False

    def settings(
        self,
        *,
        block_size: int | None = None,
        symmetric: bool | None = None,
        accuracy_level: int | None = None,
    ) -> WeightOnlySettings:
        """The method's defaults with the given overrides (None keeps the default)."""
        chosen = self.defaults
        if self.fixed_blocks and (block_size is not None or symmetric is not None):
            raise QuantizationError(
                f"method {self.name!r} keeps the source's blocks: block_size and symmetric "
                "cannot be chosen (accuracy_level can)"
            )
        if block_size is not None:
            chosen = replace(chosen, block_size=block_size)
        if symmetric is not None:
            chosen = replace(chosen, symmetric=symmetric)
        if accuracy_level is not None:
            chosen = replace(chosen, accuracy_level=accuracy_level)
        return chosen


METHODS: dict[str, Method] = {
    "int8": Method(
        name="int8",
        # accuracy_level 4 (int8 activations) is the fast CPU kernel: on SmolLM2-135M the
        # fp32-compute path (level 0) decoded about 10x slower than level 4.
        defaults=WeightOnlySettings(bits=8, block_size=32, symmetric=False, accuracy_level=4),
        summary="8-bit weight-only MatMulNBits, block 32, asymmetric, int8 activations",
        apply=_weight_only,
    ),
    "int4": Method(
        name="int4",
        # Asymmetric with block 32 matches the Q4_1 layout SmolLM2's GGUF weights came
        # from; accuracy_level 4 lets the CPU kernel use int8 activations (fast).
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4),
        summary="4-bit weight-only MatMulNBits, block 32, asymmetric, int8 activations",
        apply=_weight_only,
    ),
    "int4-shared": Method(
        name="int4-shared",
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4),
        summary="int4, and the tied embedding's lookup reads the lm_head's 4-bit blocks",
        apply=_weight_only_shared(None),
    ),
    "int4-emb8": Method(
        name="int4-emb8",
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4),
        summary="int4 layers, 8-bit lm_head shared with the tied embedding's lookup",
        apply=_weight_only_shared(8),
    ),
    "int8-shared": Method(
        name="int8-shared",
        defaults=WeightOnlySettings(bits=8, block_size=32, symmetric=False, accuracy_level=4),
        summary="int8, and the tied embedding's lookup reads the lm_head's 8-bit blocks",
        apply=_weight_only_shared(None),
    ),
    "int4-search": Method(
        name="int4-search",
        # Symmetric: on SmolLM2 asymmetric blocks cost 2.8 MiB more for 0.9% perplexity
        # (44.74 vs 45.15, docs/quantization-frontier.md); --no-symmetric gives them.
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4),
        summary="4-bit symmetric, scales searched per block (least squares), stored as fp16; "
        "the tied embedding shares the lm_head's blocks",
        apply=_searched(None),
    ),
    "gguf-head4": Method(
        name="gguf-head4",
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4),
        summary="gguf's layer blocks unchanged; the lm_head (and tied embedding) re-quantized "
        "to 4-bit with searched scales (SmolLM2: Q8_0 -> 4-bit saves 13.5 MB)",
        apply=_gguf_lm_head4,
    ),
    "gguf": Method(
        name="gguf",
        # bits/block_size describe the usual case (Q4_x); the real types per tensor are
        # in the manifest's details (gguf_tensor_types).
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4),
        summary="the GGUF source's own Q4_0/Q4_1/Q8_0 blocks carried into MatMulNBits unchanged; "
        "the tied embedding shares the lm_head's blocks",
        apply=_gguf,
        fixed_blocks=True,
    ),
}


def get_method(name: str) -> Method:
    """The registered method called ``name``; UnknownMethodError names the allowed ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown quantization method {name!r}; allowed: {sorted(METHODS)}"
        ) from None
