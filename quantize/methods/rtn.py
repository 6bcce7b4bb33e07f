"""Round-to-nearest weight-only quantization: onnxruntime's MatMulNBits quantizer.

Each block of 32 weights gets a scale (and zero point when asymmetric) from its min and
max, and every weight the nearest code: the simplest method and, at 4 bits, the least
accurate one (docs/quantization-frontier.md), hence ``-rtn`` in the 4-bit names. At 8
bits round-to-nearest loses next to nothing, so the 8-bit methods keep the plain names.
The pass itself is :func:`edge_slm_quantize.weight_only.quantize_weights`.
"""

from __future__ import annotations

from dataclasses import replace

import onnx

from edge_slm_quantize.methods.base import (
    Apply,
    Method,
    MethodContext,
    QuantizedGraph,
    lm_head_node,
    share_embedding,
)
from edge_slm_quantize.weight_only import WeightOnlySettings, quantize_weights

# Asymmetric with block 32 matches the Q4_1 layout SmolLM2's GGUF weights came from;
# accuracy_level 4 lets the CPU kernel use int8 activations (fast): on SmolLM2-135M the
# fp32-compute path (level 0) decoded about 10x slower than level 4.
_INT8 = WeightOnlySettings(bits=8, block_size=32, symmetric=False, accuracy_level=4)
_INT4 = WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4)


def _weight_only(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    return quantize_weights(model, settings, logits=logits)


def _weight_only_shared(lm_head_bits: int | None) -> Apply:
    """Weight-only quantization, the tied embedding shared with the lm_head.

    ``lm_head_bits`` (when it differs from the settings' bits) quantizes the lm_head, and
    with it the shared embedding, at its own bit width.
    """

    def apply(
        model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
    ) -> QuantizedGraph:
        if lm_head_bits is None or lm_head_bits == settings.bits:
            return share_embedding(quantize_weights(model, settings, logits=logits), logits)
        head = lm_head_node(model, logits)
        body = quantize_weights(model, settings, logits=logits, exclude=(head,))
        result = quantize_weights(
            body.model, replace(settings, bits=lm_head_bits), logits=logits, only=(head,)
        )
        return share_embedding(result, logits)

    return apply


METHODS = (
    Method(
        name="int8",
        defaults=_INT8,
        summary="8-bit weight-only MatMulNBits, round-to-nearest, block 32, asymmetric, "
        "int8 activations",
        apply=_weight_only,
    ),
    Method(
        name="int8-shared",
        defaults=_INT8,
        summary="int8, and the tied embedding's lookup reads the lm_head's 8-bit blocks",
        apply=_weight_only_shared(None),
    ),
    Method(
        name="int4-rtn",
        defaults=_INT4,
        summary="4-bit weight-only MatMulNBits, round-to-nearest (least accurate 4-bit), "
        "block 32, asymmetric, int8 activations",
        apply=_weight_only,
        aliases=("int4",),
    ),
    Method(
        name="int4-rtn-shared",
        defaults=_INT4,
        summary="int4-rtn, and the tied embedding's lookup reads the lm_head's 4-bit blocks",
        apply=_weight_only_shared(None),
        aliases=("int4-shared",),
    ),
    Method(
        name="int4-rtn-emb8",
        defaults=_INT4,
        summary="int4-rtn layers, 8-bit lm_head shared with the tied embedding's lookup",
        apply=_weight_only_shared(8),
        aliases=("int4-emb8",),
    ),
)
