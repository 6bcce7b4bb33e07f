"""Config fields a GGUF file carries that transformers 4.57's GGUF loader drops.

``from_pretrained(gguf_file=...)`` maps a fixed list of GGUF keys per architecture
(``transformers.integrations.ggml``); for the families below it misses keys that change
the model, and the float model would silently differ from what llama.cpp runs:

* ``qwen3``: ``attention.key_length`` (``head_dim``; 128 in Qwen3-0.6B, whose
  ``hidden / heads`` is 64);
* ``gemma3``: ``rope.scaling.type`` / ``rope.scaling.factor`` (linear 8 on the global
  layers of Gemma 3 4B and up), and ``query_pre_attn_scalar``, which the GGUF does not
  store: llama.cpp scales attention by ``head_dim ** -0.5``, except for the 62-layer
  27B (``hidden / heads``), and so does the released config of every size.

``sliding_window``, ``rope_theta`` and ``head_dim`` of Gemma 3 are mapped already; its
local rotary base (10,000) and layer pattern (every sixth layer global) are not in the
file and are the same fixed values in llama.cpp and in transformers' defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# llama.cpp's LLM_TYPE_27B for gemma3 (n_layer == 62): attention scaled by hidden / heads
_GEMMA3_27B_LAYERS = 62


def _fields(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def gguf_config_overrides(path: Path) -> dict[str, Any]:
    """Config attributes to set on the config transformers reads from the GGUF at ``path``."""
    fields = _fields(path)
    arch = fields.get("general.architecture")
    if arch not in ("qwen3", "gemma3"):
        return {}
    overrides: dict[str, Any] = {}
    head_dim = fields.get(f"{arch}.attention.key_length")
    if head_dim is not None:
        overrides["head_dim"] = int(head_dim)
    if arch == "gemma3":
        rope_type = fields.get("gemma3.rope.scaling.type")
        if rope_type not in (None, "none"):
            factor = float(fields["gemma3.rope.scaling.factor"])
            overrides["rope_scaling"] = {"rope_type": str(rope_type), "factor": factor}
        if int(fields["gemma3.block_count"]) == _GEMMA3_27B_LAYERS:
            hidden, heads = fields["gemma3.embedding_length"], fields["gemma3.attention.head_count"]
            overrides["query_pre_attn_scalar"] = int(hidden) // int(heads)
        elif head_dim is not None:
            overrides["query_pre_attn_scalar"] = int(head_dim)
    return overrides
