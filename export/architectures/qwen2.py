"""Qwen2: Llama with q/k/v biases and an optional sliding window.

The biases need no override: :meth:`LlamaArchitecture.attention` adds them whenever the
projections carry one. The sliding window (``use_sliding_window``) is what the fused
graph cannot express, so it is refused there.
"""

from __future__ import annotations

from typing import Any

from edge_slm_export.architectures.llama import LlamaArchitecture
from edge_slm_export.errors import UnsupportedModelError


class Qwen2Architecture(LlamaArchitecture):
    """Qwen2 / Qwen2.5: the Llama graph, its q/k/v bias Add always present."""

    model_type = "qwen2"

    def check_fused(self, config: Any) -> None:
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError(
                "sliding-window attention is not supported by the fused graph"
            )
        super().check_fused(config)


ARCHITECTURE = Qwen2Architecture()
