"""What a quantization method is, and the pieces several methods share.

A method pairs default settings with the function that applies them to a graph. A
method module (``rtn.py``, ``searched.py``, ``gguf.py``) defines its :class:`Method`
values in a module-level tuple ``METHODS``; :mod:`edge_slm_quantize.methods` collects
them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import onnx

from edge_slm.bundle import Manifest
from edge_slm_quantize.errors import QuantizationError
from edge_slm_quantize.weight_only import WeightOnlySettings


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


@dataclass(frozen=True)
class Method:
    """A registered quantization method: its defaults, a one-line summary, its function.

    Attributes:
        name: the name on the CLI and in the manifest's ``quantization.method``.
        aliases: former names still accepted (with a deprecation warning); bundles
            made under them keep loading, the runtime ignores the method name.
        fixed_blocks: the blocks come from elsewhere (a GGUF file): block size and
            symmetry are not choices.
    """

    name: str
    defaults: WeightOnlySettings
    summary: str
    apply: Apply
    fixed_blocks: bool = False
    aliases: tuple[str, ...] = ()

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


def share_embedding(inner: QuantizedGraph, logits: str) -> QuantizedGraph:
    """``inner`` with a tied embedding's lookup reading the quantized lm_head's blocks."""
    from edge_slm_quantize.shared_embedding import share_tied_embedding

    return _SharedEmbeddingGraph(inner, share_tied_embedding(inner.model, logits))


def lm_head_node(model: onnx.ModelProto, logits: str) -> str:
    """The name of the MatMul computing ``logits`` (to quantize it apart)."""
    for node in model.graph.node:
        if logits in node.output and node.op_type == "MatMul":
            return str(node.name)
    raise QuantizationError(f"no MatMul computes {logits!r}: cannot quantize the lm_head apart")
