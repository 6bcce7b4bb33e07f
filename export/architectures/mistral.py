"""Mistral: Llama with a sliding window on every layer (``config.sliding_window``).

The window is ``GroupQueryAttention``'s ``local_window_size``
(:func:`~edge_slm_export.fused_graph.local_window_size` has the semantics, checked
against transformers' mask); ``sliding_window: null`` (Mistral 7B v0.2 on) is global
attention, Llama's graph exactly. ``head_dim`` may differ from ``hidden / heads``
(Mistral-Nemo), which the shared decoder section already reads from the config.
"""

from __future__ import annotations

from typing import Any

from edge_slm.bundle import DecoderIO
from edge_slm_export.architectures.llama import LlamaArchitecture
from edge_slm_export.fused_graph import (
    AttentionSpec,
    GraphBuilder,
    linear,
    local_window_size,
    output_projection,
    packed_qkv,
    rotary_attention,
)


class MistralArchitecture(LlamaArchitecture):
    """Mistral: the Llama graph, each layer's attention limited to the sliding window."""

    model_type = "mistral"

    def attention(
        self, g: GraphBuilder, p: str, i: int, attn: Any, normed: str, config: Any, io: DecoderIO
    ) -> str:
        """Packed q/k/v projection, windowed GroupQueryAttention with rotary, o_proj."""
        weight, bias = packed_qkv(attn)
        spec = AttentionSpec(
            heads=config.num_attention_heads,
            kv_heads=io.num_kv_heads,
            head_dim=io.head_dim,
            scale=float(attn.scaling),
            window=local_window_size(getattr(config, "sliding_window", None)),
        )
        qkv = linear(g, f"{p}.qkv_proj", normed, weight, bias)
        return output_projection(g, p, attn, rotary_attention(g, p, i, spec, qkv))


ARCHITECTURE = MistralArchitecture()
