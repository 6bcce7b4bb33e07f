"""Phi-3 (Phi-3/3.5-mini, Phi-4-mini): Llama with packed projections and long-rope scaling.

What differs from :mod:`~edge_slm_export.architectures.llama`:

* the checkpoint already packs q/k/v (``qkv_proj``, rows q | k | v) and gate/up
  (``gate_up_proj``, gate first): their weights are MatMul's B as they are, transposed;
* ``partial_rotary_factor`` < 1 (Phi-4-mini): the rotary embedding covers the first
  ``head_dim * factor`` dimensions of each head; ``GroupQueryAttention`` reads that width
  off its cos/sin caches (``[max_length, rotary_dim / 2]``, a multiple of 8 there) and
  passes the rest through;
* long-rope scaling (``rope_scaling.type`` ``longrope``, formerly ``su``): transformers
  rotates with the *short* factors while the sequence stays within
  ``original_max_position_embeddings`` and switches every later step to the *long*
  factors past it (the cached keys keep their short rotation). The cos/sin caches here
  are the short path, computed by the model's own rotary module, so the graph covers at
  most ``original_max_position_embeddings`` positions (4,096 for Phi-3-mini-128k) and a
  longer ``max_length`` is refused;
* ``sliding_window`` (Phi-3-mini-4k has 2,047) on every layer, as Mistral.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import DecoderIO
from edge_slm_export.architectures.llama import STATIC_ROPE, LlamaArchitecture
from edge_slm_export.errors import UnsupportedModelError
from edge_slm_export.fused_graph import (
    AttentionSpec,
    FusedGraph,
    GraphBuilder,
    as_numpy,
    linear,
    local_window_size,
    output_projection,
    rotary_attention,
)

LONG_ROPE = ("longrope", "su")


def _rope_type(config: Any) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


class Phi3Architecture(LlamaArchitecture):
    """Phi-3: packed qkv / gate_up projections, partial rotary, long-rope (short path)."""

    model_type = "phi3"

    def check_fused(self, config: Any) -> None:
        super().check_fused(config)
        rope_type = _rope_type(config)
        if rope_type not in (*STATIC_ROPE, *LONG_ROPE):
            raise UnsupportedModelError(
                f"Phi-3 rope type {rope_type!r} is not supported by the fused graph; "
                f"supported: {[*STATIC_ROPE, 'longrope']} (use --graph optimum)"
            )

    def max_length(self, config: Any, asked: int | None) -> int:
        """Positions the graph covers: long-rope graphs stop where the long factors start.

        Raises:
            UnsupportedModelError: ``asked`` goes past ``original_max_position_embeddings``
                on a long-rope model.
        """
        if _rope_type(config) not in LONG_ROPE:
            return int(asked or config.max_position_embeddings)
        limit = int(config.original_max_position_embeddings)
        if asked is not None and asked > limit:
            raise UnsupportedModelError(
                f"max_length {asked} is past original_max_position_embeddings {limit}: the "
                "fused graph carries long-rope's short factors only (at most "
                f"{limit} positions; use --graph optimum for longer contexts)"
            )
        return min(int(asked or limit), limit)

    def build_fused_graph(
        self, model: Any, out_path: Path, max_length: int | None = None
    ) -> FusedGraph:
        """Llama's graph over at most :meth:`max_length` positions (see base)."""
        self.check_fused(model.config)
        return super().build_fused_graph(model, out_path, self.max_length(model.config, max_length))

    def rotary_caches(
        self, model: Any, max_length: int, head_dim: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin ``[max_length, rotary_dim / 2]`` from the model's rotary module (short
        factors for long-rope, as transformers uses them below the original length)."""
        import torch

        positions = torch.arange(max_length, dtype=torch.int64)[None]
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        cos_np, sin_np = as_numpy(cos[0]), as_numpy(sin[0])
        half = cos_np.shape[-1] // 2
        if cos_np.shape[-1] > head_dim or not (
            np.array_equal(cos_np[:, :half], cos_np[:, half:])
            and np.array_equal(sin_np[:, :half], sin_np[:, half:])
        ):
            raise UnsupportedModelError("the rotary embedding is not in the rotate_half layout")
        if half != head_dim // 2 and half % 8:
            raise UnsupportedModelError(
                f"a partial rotary embedding over {2 * half} of {head_dim} head dimensions is "
                "not supported by GroupQueryAttention (half the rotary width must be a multiple "
                "of 8; use --graph optimum)"
            )
        return np.ascontiguousarray(cos_np[:, :half]), np.ascontiguousarray(sin_np[:, :half])

    def attention(
        self, g: GraphBuilder, p: str, i: int, attn: Any, normed: str, config: Any, io: DecoderIO
    ) -> str:
        """The packed ``qkv_proj``, windowed GroupQueryAttention with rotary, ``o_proj``."""
        bias = None if attn.qkv_proj.bias is None else as_numpy(attn.qkv_proj.bias)
        qkv = linear(g, f"{p}.qkv_proj", normed, as_numpy(attn.qkv_proj.weight).T, bias)
        spec = AttentionSpec(
            heads=config.num_attention_heads,
            kv_heads=io.num_kv_heads,
            head_dim=io.head_dim,
            scale=float(attn.scaling),
            window=local_window_size(getattr(config, "sliding_window", None)),
        )
        return output_projection(g, p, attn, rotary_attention(g, p, i, spec, qkv))

    def mlp(self, g: GraphBuilder, p: str, mlp: Any, normed: str) -> str:
        """The packed ``gate_up_proj`` (gate first), ``silu(gate) * up``, ``down_proj``."""
        if getattr(mlp.gate_up_proj, "bias", None) is not None:
            raise UnsupportedModelError("MLP biases are not supported by the fused graph")
        inter = mlp.gate_up_proj.weight.shape[0] // 2
        gate_up = linear(g, f"{p}.gate_up_proj", normed, as_numpy(mlp.gate_up_proj.weight).T)
        split = g.weight(f"{p}.split", np.asarray([inter, inter], dtype=np.int64))
        gate, up = g.node("Split", [gate_up, split], [f"{p}.gate", f"{p}.up"], f"{p}.split",
                          axis=-1)  # fmt: skip
        (sig,) = g.node("Sigmoid", [gate], [f"{p}.sig"], f"{p}.sigmoid")
        (silu,) = g.node("Mul", [gate, sig], [f"{p}.silu"], f"{p}.silu")
        (act,) = g.node("Mul", [silu, up], [f"{p}.act"], f"{p}.act")
        return linear(g, f"{p}.down_proj", act, as_numpy(mlp.down_proj.weight).T)


ARCHITECTURE = Phi3Architecture()
