"""Searched-scale 4-bit blocks: each block's scale chosen by least squares, not min/max.

The search is :mod:`edge_slm_quantize.search`; the lm_head's error is weighted by the
final RMSNorm's scale squared (data-free importance) and the tied embedding shares the
lm_head's blocks.
"""

from __future__ import annotations

import onnx

from edge_slm_quantize.methods.base import (
    Apply,
    Method,
    MethodContext,
    QuantizedGraph,
    lm_head_node,
    share_embedding,
)
from edge_slm_quantize.weight_only import WeightOnlySettings


def _searched(lm_head_bits: int | None) -> Apply:
    """Searched-scale block quantization, embedding shared."""

    def apply(
        model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
    ) -> QuantizedGraph:
        from edge_slm_quantize.search import lm_head_importance, quantize_graph

        bits_for = None
        if lm_head_bits is not None and lm_head_bits != settings.bits:
            bits_for = {lm_head_node(model, logits): lm_head_bits}
        result = quantize_graph(
            model,
            settings,
            logits=logits,
            bits_for=bits_for,
            importance=lm_head_importance(model, logits),
        )
        return share_embedding(result, logits)

    return apply


METHODS = (
    Method(
        name="int4-search",
        # Symmetric: on SmolLM2 asymmetric blocks cost 2.8 MiB more for 0.9% perplexity
        # (44.74 vs 45.15, docs/quantization-frontier.md); --no-symmetric gives them.
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4),
        summary="4-bit symmetric, scales searched per block (least squares), stored as fp16; "
        "the tied embedding shares the lm_head's blocks",
        apply=_searched(None),
    ),
)
