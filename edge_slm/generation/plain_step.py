"""One forward step of a plain (optimum-layout) decoder graph, bound by name.

The graph takes the past keys and values as inputs and returns the presents as new
arrays, so every conversation's KV arrays are its own and any number of threads may
run steps at once (onnxruntime's ``run`` is thread-safe). Rows may be left-padded
(``attention_mask`` zeros), which :mod:`edge_slm.generation.batch` uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edge_slm.bundle import DecoderIO
from edge_slm.errors import BundleError

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class KVCache:
    """Past keys/values of every layer and the token ids they were computed from.

    ``keys[i]`` and ``values[i]`` are ``[batch, kv_heads, length, head_dim]``;
    ``tokens`` is ``[batch, length]`` (padding included, see ``attention_mask``).
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    tokens: np.ndarray  # [batch, length] int64
    attention_mask: np.ndarray  # [batch, length] int64

    @property
    def length(self) -> int:
        """Number of positions cached."""
        return int(self.tokens.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the valid keys and values."""
        return sum(int(a.nbytes) for a in self.keys + self.values)

    def truncated(self, length: int) -> KVCache:
        """The cache of the first ``length`` positions (views, no copy)."""
        return KVCache(
            keys=[k[:, :, :length] for k in self.keys],
            values=[v[:, :, :length] for v in self.values],
            tokens=self.tokens[:, :length],
            attention_mask=self.attention_mask[:, :length],
        )


class PlainDecoder:
    """A decoder-only ONNX graph in optimum's layout, run step by step; stateless."""

    supports_padding = True
    """Whether rows of a batch may be left-padded (``attention_mask`` with zeros)."""

    def __init__(self, session: ort.InferenceSession, io: DecoderIO, source: str = "") -> None:
        self.io = io
        self.session = session
        self.session_source = source
        """Where the session came from (prepared-session cache hit, built, off)."""
        self._past = io.past_names()
        self._present = io.present_names()
        self._output_names = [io.logits] + [n for pair in self._present for n in pair]
        self.kv_dtype = self._check_graph()

    def _check_graph(self) -> type[np.floating]:
        """Fail early unless the graph's I/O matches the manifest; returns the KV dtype."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        wanted_in = [self.io.input_ids, self.io.attention_mask] + [n for p in self._past for n in p]
        if self.io.position_ids is not None:
            wanted_in.append(self.io.position_ids)
        missing = [n for n in wanted_in if n not in inputs]
        missing += [n for n in self._output_names if n not in outputs]
        if missing:
            raise BundleError(
                f"the ONNX graph lacks inputs/outputs named in the manifest: {missing[:6]}"
            )
        extra = sorted(set(inputs) - set(wanted_in))
        if extra:
            raise BundleError(f"the ONNX graph has inputs the manifest does not describe: {extra}")
        past = inputs[self._past[0][0]]
        shape = past.shape
        if shape[1] != self.io.num_kv_heads or shape[3] != self.io.head_dim:
            raise BundleError(
                f"graph KV shape {shape} disagrees with manifest "
                f"(kv_heads={self.io.num_kv_heads}, head_dim={self.io.head_dim})"
            )
        dtype = _ORT_TO_NUMPY.get(past.type)
        if dtype is None:
            raise BundleError(f"unsupported KV-cache element type {past.type}")
        return dtype

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one position of one row takes (keys and values of every layer)."""
        io = self.io
        return 2 * io.num_layers * io.num_kv_heads * io.head_dim * np.dtype(self.kv_dtype).itemsize

    def empty_cache(self, batch: int) -> KVCache:
        """A cache of length 0 for ``batch`` rows (what prefill starts from)."""
        shape = (batch, self.io.num_kv_heads, 0, self.io.head_dim)
        empty = [np.zeros(shape, dtype=self.kv_dtype) for _ in range(self.io.num_layers)]
        return KVCache(
            keys=empty,
            values=list(empty),
            tokens=np.zeros((batch, 0), dtype=np.int64),
            attention_mask=np.zeros((batch, 0), dtype=np.int64),
        )

    def cache_from_arrays(
        self, keys: list[np.ndarray], values: list[np.ndarray], tokens: np.ndarray
    ) -> KVCache:
        """A cache over saved arrays ``[1, kv_heads, length, head_dim]`` (a prefix cache)."""
        return KVCache(list(keys), list(values), tokens, np.ones_like(tokens))

    def forward(
        self,
        input_ids: np.ndarray,
        cache: KVCache,
        attention_mask: np.ndarray | None = None,
        all_positions: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """Run ``input_ids`` after ``cache``; returns (logits, the cache extended by them).

        ``cache`` is not modified: the result is a new cache over new arrays.

        Args:
            input_ids: ``[batch, seq]`` int64 new tokens.
            cache: the past (length 0 for prefill).
            attention_mask: ``[batch, seq]`` mask of the new tokens (0 = left padding);
                None means all ones.
            all_positions: return the logits of every new position ``[batch, seq, vocab]``
                (for scoring) instead of the last one only ``[batch, vocab]``.
        """
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = np.ones((batch, seq), dtype=np.int64)
        full_mask = np.concatenate([cache.attention_mask, attention_mask], axis=1)  # [B, P+S]
        feed: dict[str, np.ndarray] = {
            self.io.input_ids: input_ids,
            self.io.attention_mask: full_mask,
        }
        if self.io.position_ids is not None:
            # Positions count real tokens only, so left padding does not shift them.
            positions = np.cumsum(full_mask, axis=1) - 1
            feed[self.io.position_ids] = np.maximum(positions[:, cache.length :], 0)
        for (key_name, value_name), key, value in zip(
            self._past, cache.keys, cache.values, strict=True
        ):
            feed[key_name] = key
            feed[value_name] = value
        outputs = self.session.run(self._output_names, feed)
        logits = outputs[0] if all_positions else outputs[0][:, -1, :]
        new_cache = KVCache(
            keys=outputs[1::2],
            values=outputs[2::2],
            tokens=np.concatenate([cache.tokens, input_ids], axis=1),
            attention_mask=full_mask,
        )
        return np.asarray(logits, dtype=np.float32), new_cache

    def all_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Logits of every position ``[batch, seq, vocab]`` from an empty cache (scoring)."""
        cache = self.empty_cache(input_ids.shape[0])
        logits, _ = self.forward(input_ids, cache, attention_mask, all_positions=True)
        return logits
