"""The KV-cache loop of the fused decoder graph (``DecoderIO.layout == "gqa-shared"``).

The graph (written by ``export/fused.py``) runs onnxruntime's GroupQueryAttention,
whose past and present KV tensors may be one buffer: bound twice through IOBinding,
the kernel writes the new positions in place, so a decode step copies nothing but one
token's keys and values. :class:`FusedDecoderModel` offers the interface of
:class:`~edge_slm.decoder.DecoderModel` (``forward``, ``empty_cache``, ``all_logits``,
``io``), so :class:`~edge_slm.generation.TextGenerator` drives either unchanged.

Buffers are preallocated per cache and grow by doubling (a few copies per generation,
none per token). A :class:`FusedKVCache` is a view of its buffers up to ``length``:
``truncated`` is free, and the positions past ``length`` are scratch that the next
step overwrites. As in llama.cpp, two caches that share buffers must not both be
extended: extending one overwrites the other's positions beyond their common prefix
(the generator only ever extends its latest cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_slm.bundle import DecoderIO
from edge_slm.engine.prepared_cache import CacheSetting
from edge_slm.engine.session import open_session
from edge_slm.errors import BundleError, ContextLengthError, InvalidArgumentError
from edge_slm.generation.plain_step import DecoderModel, KVCache

LAYOUT = "gqa-shared"
_MIN_CAPACITY = 256
_CAPACITY_STEP = 64


@dataclass
class FusedKVCache(KVCache):
    """A cache over shared buffers: ``keys[i]``/``values[i]`` are whole buffers
    ``[batch, kv_heads, capacity, head_dim]`` of which the first ``length`` positions
    are valid."""

    @property
    def capacity(self) -> int:
        """Positions the buffers hold before they must grow."""
        return int(self.keys[0].shape[2]) if self.keys else 0

    def truncated(self, length: int) -> FusedKVCache:
        """The cache of the first ``length`` positions (same buffers, no copy)."""
        return FusedKVCache(
            keys=self.keys,
            values=self.values,
            tokens=self.tokens[:, :length],
            attention_mask=self.attention_mask[:, :length],
        )


class FusedDecoderModel(DecoderModel):
    """A fused (GroupQueryAttention, shared KV buffer) decoder graph, step by step."""

    def __init__(
        self,
        model_path: Path,
        io: DecoderIO,
        threads: int | None = None,
        spinning: bool | None = None,
        *,
        cache: CacheSetting = None,
    ) -> None:
        if io.layout != LAYOUT:
            raise BundleError(f"FusedDecoderModel needs layout {LAYOUT!r}, got {io.layout!r}")
        if not (io.seqlens_k and io.total_sequence_length and io.logits_positions):
            raise BundleError(
                "a gqa-shared decoder section needs seqlens_k, total_sequence_length "
                "and logits_positions input names"
            )
        self.io = io
        opened = open_session(model_path, threads, spinning, cache=cache)
        self.session: ort.InferenceSession = opened.session
        self.session_source = opened.detail
        self._past = io.past_names()
        self._present = io.present_names()
        self._output_names = [io.logits] + [n for pair in self._present for n in pair]
        self.kv_dtype = self._check_graph()
        self.max_length = int(io.max_length or 0)
        self._vocab = self._vocab_size()
        self._binding = self.session.io_binding()
        self._bound_keys: list[np.ndarray] | None = None
        self._kv_values: list[Any] = []  # OrtValues over the bound buffers (kept alive)
        self._one_logits: np.ndarray | None = None  # [batch, 1, vocab], reused per step

    def _check_graph(self) -> type[np.floating]:
        """Fail early unless the graph's I/O matches the manifest; returns the KV dtype."""
        io = self.io
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        wanted_in = [io.input_ids, io.seqlens_k, io.total_sequence_length, io.logits_positions]
        wanted_in += [n for pair in self._past for n in pair]
        missing = [n for n in wanted_in if n not in inputs]
        missing += [n for n in self._output_names if n not in outputs]
        if missing:
            raise BundleError(
                f"the ONNX graph lacks inputs/outputs named in the manifest: {missing[:6]}"
            )
        extra = sorted(set(inputs) - {str(n) for n in wanted_in})
        if extra:
            raise BundleError(f"the ONNX graph has inputs the manifest does not describe: {extra}")
        past = inputs[self._past[0][0]]
        shape = past.shape
        if shape[1] != io.num_kv_heads or shape[3] != io.head_dim:
            raise BundleError(
                f"graph KV shape {shape} disagrees with manifest "
                f"(kv_heads={io.num_kv_heads}, head_dim={io.head_dim})"
            )
        if past.type != "tensor(float)":
            raise BundleError(f"unsupported KV-cache element type {past.type} (float only)")
        if not io.max_length or io.max_length < 1:
            raise BundleError("a gqa-shared decoder section needs max_length >= 1")
        return np.float32

    def _buffers(self, batch: int, capacity: int) -> list[np.ndarray]:
        shape = (batch, self.io.num_kv_heads, capacity, self.io.head_dim)
        return [np.empty(shape, dtype=self.kv_dtype) for _ in range(self.io.num_layers)]

    supports_padding = False  # GroupQueryAttention here takes no padding mask

    def cache_from_arrays(
        self, keys: list[np.ndarray], values: list[np.ndarray], tokens: np.ndarray
    ) -> FusedKVCache:
        """A cache over saved arrays; the buffers grow (copy) on first extension."""
        return FusedKVCache(
            [np.ascontiguousarray(k) for k in keys],
            [np.ascontiguousarray(v) for v in values],
            tokens,
            np.ones_like(tokens),
        )

    def empty_cache(self, batch: int) -> FusedKVCache:
        """A cache of length 0 for ``batch`` rows; its buffers are allocated on first use."""
        return FusedKVCache(
            keys=self._buffers(batch, 0),
            values=self._buffers(batch, 0),
            tokens=np.zeros((batch, 0), dtype=np.int64),
            attention_mask=np.zeros((batch, 0), dtype=np.int64),
        )

    def _grown(self, cache: FusedKVCache, total: int) -> FusedKVCache:
        """``cache`` moved into buffers that hold at least ``total`` positions."""
        capacity = max(total, 2 * cache.capacity, _MIN_CAPACITY)
        capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP
        capacity = max(total, min(capacity, self.max_length))
        batch, length = cache.tokens.shape
        keys, values = self._buffers(batch, capacity), self._buffers(batch, capacity)
        for new, old in zip(keys + values, cache.keys + cache.values, strict=True):
            new[:, :, :length] = old[:, :, :length]
        return FusedKVCache(keys, values, cache.tokens, cache.attention_mask)

    def _bind_cache(self, cache: FusedKVCache) -> None:
        """Bind each layer's buffer as both its past input and its present output."""
        if cache.keys is self._bound_keys:
            return
        self._kv_values = []
        for (past_k, past_v), (pres_k, pres_v), key, value in zip(
            self._past, self._present, cache.keys, cache.values, strict=True
        ):
            for past, present, array in ((past_k, pres_k, key), (past_v, pres_v, value)):
                value_ = ort.OrtValue.ortvalue_from_numpy(array)
                self._binding.bind_ortvalue_input(past, value_)
                self._binding.bind_ortvalue_output(present, value_)
                self._kv_values.append(value_)
        self._bound_keys = cache.keys

    def _run(
        self, input_ids: np.ndarray, cache: KVCache, positions: np.ndarray
    ) -> tuple[np.ndarray, FusedKVCache]:
        """One graph run; returns (logits ``[batch, len(positions), vocab]``, new cache)."""
        if not isinstance(cache, FusedKVCache):
            raise InvalidArgumentError(
                f"a gqa-shared model needs a FusedKVCache (from empty_cache), got {type(cache).__name__}"
            )
        batch, seq = input_ids.shape
        if cache.tokens.shape[0] != batch:
            raise InvalidArgumentError(
                f"cache batch {cache.tokens.shape[0]} != input batch {batch}"
            )
        if batch > 1 and cache.length > 0 and seq > 1:
            raise InvalidArgumentError(
                "several new tokens after a past need batch 1 (GroupQueryAttention)"
            )
        total = cache.length + seq
        if total > self.max_length:
            raise ContextLengthError(
                f"{total} positions exceed the graph's max_length {self.max_length}"
            )
        if total > cache.capacity:
            cache = self._grown(cache, total)
        self._bind_cache(cache)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        binding = self._binding
        io = self.io
        assert io.seqlens_k and io.total_sequence_length and io.logits_positions
        binding.bind_cpu_input(io.input_ids, input_ids)
        binding.bind_cpu_input(io.seqlens_k, np.full((batch,), total - 1, dtype=np.int32))
        binding.bind_cpu_input(io.total_sequence_length, np.array(total, dtype=np.int32))
        binding.bind_cpu_input(io.logits_positions, positions)
        shape = (batch, positions.shape[0], self._vocab)
        if shape[1] == 1:
            if self._one_logits is None or self._one_logits.shape != shape:
                self._one_logits = np.empty(shape, dtype=np.float32)
            logits = self._one_logits
        else:
            logits = np.empty(shape, dtype=np.float32)
        binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        new_cache = FusedKVCache(
            keys=cache.keys,
            values=cache.values,
            tokens=np.concatenate([cache.tokens, input_ids], axis=1),
            attention_mask=np.concatenate(
                [cache.attention_mask, np.ones((batch, seq), dtype=np.int64)], axis=1
            ),
        )
        return logits, new_cache

    def _vocab_size(self) -> int:
        dim = self.session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise BundleError(f"the logits output has no fixed vocabulary size: {dim!r}")
        return dim

    def forward(
        self,
        input_ids: np.ndarray,
        cache: KVCache,
        attention_mask: np.ndarray | None = None,
        all_positions: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """Run ``input_ids`` after ``cache``; returns (logits, the cache extended by them).

        Args:
            input_ids: ``[batch, seq]`` int64 new tokens (batch 1 when ``seq > 1`` after a
                past).
            cache: a :class:`FusedKVCache` (length 0 for prefill).
            attention_mask: must be None or all ones: the fused graph has no padding.
            all_positions: return the logits of every new position ``[batch, seq, vocab]``
                instead of the last one only ``[batch, vocab]`` (the graph then computes
                the lm_head for every position; otherwise for the last one only).

        Returns:
            float32 logits, and the cache extended by ``seq`` positions (same buffers
            unless they had to grow).
        """
        if attention_mask is not None and not np.all(attention_mask == 1):
            raise InvalidArgumentError("the fused (gqa-shared) graph does not support padding")
        seq = input_ids.shape[1]
        if all_positions:
            logits, new_cache = self._run(input_ids, cache, np.arange(seq, dtype=np.int64))
            return logits, new_cache
        last = np.asarray([seq - 1], dtype=np.int64)
        logits, new_cache = self._run(input_ids, cache, last)
        return logits[:, 0, :].copy(), new_cache

    def all_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Logits of every position ``[batch, seq, vocab]`` from an empty cache (scoring)."""
        if attention_mask is not None and not np.all(attention_mask == 1):
            raise InvalidArgumentError("the fused (gqa-shared) graph does not support padding")
        batch, seq = input_ids.shape
        logits, _ = self._run(input_ids, self.empty_cache(batch), np.arange(seq, dtype=np.int64))
        return logits


def open_decoder(
    model_path: Path,
    io: DecoderIO,
    threads: int | None = None,
    spinning: bool | None = None,
    *,
    cache: CacheSetting = None,
) -> DecoderModel:
    """The step model a bundle's decoder section calls for (optimum or gqa-shared layout).

    ``cache``: the prepared-session cache (see :func:`edge_slm.session.create_session`).
    """
    if io.layout == LAYOUT:
        return FusedDecoderModel(model_path, io, threads, spinning, cache=cache)
    if io.layout != "optimum":
        raise BundleError(f"unknown decoder layout {io.layout!r}; allowed: ['optimum', {LAYOUT!r}]")
    return DecoderModel(model_path, io, threads, spinning, cache=cache)
