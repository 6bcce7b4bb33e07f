"""Qwen3: Llama with per-head RMS norms on q and k before the rotary embedding.

``q_norm`` and ``k_norm`` (weights ``[head_dim]``) normalize each head's query and key
before rotation, so the packed projection is split, both are normed per head
(:func:`~edge_slm_export.fused_graph.rms_norm_heads`) and ``GroupQueryAttention`` takes
q, k and v separately, rotating them inside. Layers that ``config.layer_types`` marks
``sliding_attention`` (``use_sliding_window``) get the window through the kernel's
``local_window_size``; the rest of the graph is Llama's.
"""

from __future__ import annotations

from typing import Any

from edge_slm.bundle import DecoderIO
from edge_slm_export.architectures.llama import LlamaArchitecture
from edge_slm_export.fused_graph import (
    AttentionSpec,
    GraphBuilder,
    as_numpy,
    linear,
    local_window_size,
    output_projection,
    packed_qkv,
    rotary_attention,
)


def layer_window(config: Any, i: int) -> int:
    """``local_window_size`` of layer ``i``: its sliding window if ``layer_types`` says so."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = i < len(layer_types) and layer_types[i] == "sliding_attention"
    return local_window_size(config.sliding_window if sliding else None)


class Qwen3Architecture(LlamaArchitecture):
    """Qwen3 (dense): the Llama graph with q/k norms and optional sliding-window layers."""

    model_type = "qwen3"

    def attention(
        self, g: GraphBuilder, p: str, i: int, attn: Any, normed: str, config: Any, io: DecoderIO
    ) -> str:
        """Packed projection, per-head q/k RMS norms, GroupQueryAttention, o_proj."""
        weight, bias = packed_qkv(attn)
        qkv = linear(g, f"{p}.qkv_proj", normed, weight, bias)
        spec = AttentionSpec(
            heads=config.num_attention_heads,
            kv_heads=io.num_kv_heads,
            head_dim=io.head_dim,
            scale=float(attn.scaling),
            window=layer_window(config, i),
        )
        norms = (as_numpy(attn.q_norm.weight), as_numpy(attn.k_norm.weight),
                 float(attn.q_norm.variance_epsilon))  # fmt: skip
        return output_projection(g, p, attn, rotary_attention(g, p, i, spec, qkv, norms))


ARCHITECTURE = Qwen3Architecture()
