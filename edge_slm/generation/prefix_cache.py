"""Prefix-cache files: the KV cache of a fixed prefix (a long system prompt) on disk.

A file is an ``.npz`` of arrays only (no pickle): the token ids, the keys and values of
every layer ``[1, kv_heads, n, head_dim]`` and the sha256 of the bundle's graph, so a
cache made for another model is refused. :class:`SavedPrefix` is the loaded, read-only
form a model keeps and its conversations copy from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import DecoderIO
from edge_slm.errors import BundleError


@dataclass(frozen=True)
class SavedPrefix:
    """A prefix's token ids and KV arrays (never modified once made)."""

    tokens: tuple[int, ...]
    keys: list[np.ndarray]  # per layer [1, kv_heads, n, head_dim]
    values: list[np.ndarray]

    def shared_with(self, ids: list[int], limit: int) -> int:
        """How many leading ids (at most ``limit``) equal this prefix's."""
        n = 0
        for a, b in zip(self.tokens[:limit], ids[:limit], strict=False):
            if a != b:
                break
            n += 1
        return n


def save_prefix(path: Path, prefix: SavedPrefix, model_sha256: str) -> Path:
    """Write ``prefix`` to ``path`` with the graph's sha256."""
    arrays: dict[str, Any] = {f"key_{i}": k for i, k in enumerate(prefix.keys)}
    arrays.update({f"value_{i}": v for i, v in enumerate(prefix.values)})
    with open(path, "wb") as fh:
        np.savez(
            fh,
            tokens=np.asarray([prefix.tokens], dtype=np.int64),
            model_sha256=np.asarray(model_sha256),
            **arrays,
        )
    return path


def load_prefix(
    path: Path, io: DecoderIO, kv_dtype: type[np.floating], model_sha256: str, context_length: int
) -> SavedPrefix:
    """Read a prefix-cache file made for this graph.

    Raises:
        BundleError: the file is not a prefix cache, or not one of this graph.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["model_sha256"]) != model_sha256:
                raise BundleError(f"prefix cache {str(path)!r} was made for another model")
            tokens = np.asarray(data["tokens"], dtype=np.int64)
            keys = [np.asarray(data[f"key_{i}"]) for i in range(io.num_layers)]
            values = [np.asarray(data[f"value_{i}"]) for i in range(io.num_layers)]
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{str(path)!r} is not a valid prefix cache: {exc}") from None
    if tokens.ndim != 2 or tokens.shape[0] != 1 or not 0 < tokens.shape[1] < context_length:
        raise BundleError(f"prefix cache {str(path)!r} has a token array that does not fit")
    expected = (1, io.num_kv_heads, tokens.shape[1], io.head_dim)
    if any(a.shape != expected or a.dtype != kv_dtype for a in keys + values):
        raise BundleError(f"prefix cache {str(path)!r} has shapes that do not fit this model")
    return SavedPrefix(tuple(int(t) for t in tokens[0]), keys, values)
