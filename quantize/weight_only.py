"""Weight-only block quantization of a graph's MatMul weights (onnxruntime MatMulNBits).

Each constant MatMul weight ``W [K, N]`` is cut into blocks of ``block_size`` values
along K; a block keeps 4 or 8-bit integers, one fp32 scale and (asymmetric) one zero
point. Activations stay fp32 unless ``accuracy_level`` lets the kernel quantize them
to int8 on the fly (level 4), which is what makes 4-bit fast on CPUs.

Before quantizing, :mod:`edge_slm_quantize.graph_passes` exposes the weights the quantizer would
otherwise miss (GPT-2's Gemm layers, a tied lm_head behind a Transpose). Afterwards
:func:`census` counts what became MatMulNBits and what stayed float, so the manifest
reports it instead of the caller having to trust it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import onnx

from edge_slm_quantize.errors import QuantizationError
from edge_slm_quantize.graph_passes import fold_weight_transposes, rewrite_gemms

ALLOWED_BITS = (4, 8)
ALLOWED_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MIN_BLOCK_SIZE = 16
_QUANTIZER_LOGGER = "onnxruntime.quantization"
# Ops through which the logits output is traced back to the lm_head.
_PASS_THROUGH = {"Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Add", "Flatten"}


@dataclass(frozen=True)
class WeightOnlySettings:
    """Settings of MatMulNBits weight-only quantization.

    Attributes:
        bits: 4 or 8 bits per weight.
        block_size: weights per scale along K; a power of two, at least 16.
        symmetric: no zero point (int range centred on 0) when True.
        accuracy_level: MatMulNBits compute type: 0/None = kernel default (fp32),
            1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
    """

    bits: int
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int | None = None

    def check(self) -> None:
        """Raise QuantizationError naming the bad value and the allowed range."""
        if self.bits not in ALLOWED_BITS:
            raise QuantizationError(f"bits must be one of {list(ALLOWED_BITS)}, got {self.bits}")
        size = self.block_size
        if size < MIN_BLOCK_SIZE or size & (size - 1):
            raise QuantizationError(
                f"block_size must be a power of two >= {MIN_BLOCK_SIZE} (e.g. 32, 64, 128), got {size}"
            )
        if self.accuracy_level is not None and self.accuracy_level not in ALLOWED_ACCURACY_LEVELS:
            raise QuantizationError(
                f"accuracy_level must be one of {list(ALLOWED_ACCURACY_LEVELS)}, got {self.accuracy_level}"
            )


@dataclass(frozen=True)
class MatMulCensus:
    """What a graph's matrix products are after quantization.

    Attributes:
        quantized: MatMulNBits nodes (weights in 4/8 bits).
        float_weight: MatMul/Gemm nodes whose weight input is still a float constant.
        activation: MatMul nodes whose inputs are both activations (attention scores,
            attention-weighted values, rotary angles): nothing to quantize there.
        float_weight_nodes: names of the ``float_weight`` nodes.
    """

    quantized: int
    float_weight: int
    activation: int
    float_weight_nodes: tuple[str, ...]


@dataclass(frozen=True)
class WeightOnlyResult:
    """The quantized graph and the facts the manifest records about it."""

    model: onnx.ModelProto
    settings: WeightOnlySettings
    gemms_rewritten: int
    gemms_kept: tuple[str, ...]
    folded_transposes: tuple[str, ...]
    census: MatMulCensus
    lm_head: str  # op type of the logits' producer: "MatMulNBits" when quantized

    def details(self) -> dict[str, Any]:
        """JSON-ready facts for ``Quantization.details``."""
        if self.folded_transposes:
            tied = (
                f"the lm_head read Transpose({', '.join(self.folded_transposes)}); the transpose "
                "was folded into its own initializer so the lm_head could be quantized; the "
                "embedding lookup keeps the fp32 table"
            )
        else:
            tied = None
        return {
            **census_details(self.census),
            "gemms_rewritten": self.gemms_rewritten,
            "gemms_kept": list(self.gemms_kept),
            "lm_head": "quantized" if self.lm_head == "MatMulNBits" else f"float ({self.lm_head})",
            "tied_lm_head": tied,
            "embedding": "fp32 (Gather is not quantized by this method)",
        }


@contextmanager
def _quiet_quantizer() -> Iterator[Any]:
    """Import onnxruntime's quantizer without its side effects, and silence its INFO lines.

    The module calls ``logging.basicConfig(level=INFO)`` at import, which would install a
    root handler in the caller's process; the root logger is restored afterwards. The
    quantizer logs one INFO line per node; its logger is held at WARNING meanwhile.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    quant_logger = logging.getLogger(_QUANTIZER_LOGGER)
    previous = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    try:
        yield matmul_nbits_quantizer
    finally:
        quant_logger.setLevel(previous)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors computable from initializers alone (graph nodes are in topological order)."""
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(node.output)
    return constant


def census(model: onnx.ModelProto) -> MatMulCensus:
    """Count quantized, float-weight and activation matrix products of the top-level graph."""
    graph = model.graph
    constant = _constant_names(graph)
    quantized = activation = 0
    float_nodes: list[str] = []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            quantized += 1
        elif node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            if node.input[1] in constant or node.input[0] in constant:
                float_nodes.append(node.name or node.output[0])
            else:
                activation += 1
    return MatMulCensus(quantized, len(float_nodes), activation, tuple(float_nodes))


def census_details(counts: MatMulCensus) -> dict[str, Any]:
    """The manifest's MatMul counts (``Quantization.details``), from a census."""
    return {
        "quantized_matmuls": counts.quantized,
        "remaining_float_matmuls": counts.float_weight,
        "remaining_float_matmul_nodes": list(counts.float_weight_nodes),
        "activation_matmuls": counts.activation,
    }


def logits_producer(model: onnx.ModelProto, logits: str) -> str:
    """Op type of the node that computes ``logits``, looking through reshapes and casts.

    Returns "missing" when the graph has no such output.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    name = logits
    for _ in range(32):
        node = producers.get(name)
        if node is None:
            return "missing"
        if node.op_type not in _PASS_THROUGH:
            return str(node.op_type)
        name = node.input[0]
    return "missing"


def quantize_weights(
    model: onnx.ModelProto,
    settings: WeightOnlySettings,
    *,
    logits: str = "logits",
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> WeightOnlyResult:
    """Quantize every constant MatMul weight of ``model`` to ``settings.bits`` bits.

    ``model`` is changed in place (graph passes) and handed to onnxruntime's
    ``MatMulNBitsQuantizer``; the returned result holds the quantized graph.

    Args:
        model: an fp32 decoder graph with its weights loaded.
        settings: bits, block size, symmetry and accuracy level.
        logits: name of the logits output, to report whether the lm_head got quantized.
        exclude: MatMul node names to leave alone (e.g. the lm_head, for another bit width).
        only: quantize these MatMul node names and nothing else (None: all).

    Raises:
        QuantizationError: invalid settings.
    """
    settings.check()
    gemms = rewrite_gemms(model)
    folded = fold_weight_transposes(model)
    with _quiet_quantizer() as nbits:
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=settings.block_size,
            is_symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level,
            bits=settings.bits,
        )
        quantizer = nbits.MatMulNBitsQuantizer(
            model,
            algo_config=config,
            nodes_to_exclude=list(exclude),
            nodes_to_include=list(only) if only is not None else None,
        )
        quantizer.process()
        quantized: onnx.ModelProto = quantizer.model.model
    return WeightOnlyResult(
        model=quantized,
        settings=settings,
        gemms_rewritten=gemms.rewritten,
        gemms_kept=gemms.kept,
        folded_transposes=folded,
        census=census(quantized),
        lm_head=logits_producer(quantized, logits),
    )
