"""One forward step of the fused decoder graph (``DecoderIO.layout == "gqa-shared"``).

The graph (written by the build stage's fused-graph builder) runs onnxruntime's
GroupQueryAttention, whose past and present KV tensors may be one buffer: bound twice
through an IOBinding, the kernel writes the new positions in place, so a decode step
copies nothing but one token's keys and values. ``seqlens_k`` gives each row its own
past length, so rows of different lengths share one decode step.

:class:`FusedDecoder` is stateless: the caller owns the KV buffers and the binding
(:class:`~edge_slm.generation.kv_pool.KVPool` for conversations, private buffers for
:meth:`FusedDecoder.all_logits`), so any number of threads may use one decoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from edge_slm.bundle import DecoderIO
from edge_slm.errors import BundleError, ContextLengthError, InvalidArgumentError

LAYOUT = "gqa-shared"


class Binding:
    """An IOBinding with every layer's KV buffer bound as both past and present.

    Holds the OrtValues over the buffers so they stay alive as long as the binding.
    """

    def __init__(self, decoder: FusedDecoder, keys: list[np.ndarray], values: list[np.ndarray]):
        self.binding = decoder.session.io_binding()
        self._values: list[Any] = []
        for (past_k, past_v), (pres_k, pres_v), key, value in zip(
            decoder.past_names, decoder.present_names, keys, values, strict=True
        ):
            for past, present, array in ((past_k, pres_k, key), (past_v, pres_v, value)):
                if not array.flags.c_contiguous:
                    raise InvalidArgumentError("a bound KV buffer must be C-contiguous")
                ort_value = ort.OrtValue.ortvalue_from_numpy(array)
                self.binding.bind_ortvalue_input(past, ort_value)
                self.binding.bind_ortvalue_output(present, ort_value)
                self._values.append(ort_value)


class FusedDecoder:
    """A fused (GroupQueryAttention, shared KV buffer) decoder graph; stateless."""

    supports_padding = False  # GroupQueryAttention here takes no padding mask

    def __init__(self, session: ort.InferenceSession, io: DecoderIO, source: str = "") -> None:
        if io.layout != LAYOUT:
            raise BundleError(f"FusedDecoder needs layout {LAYOUT!r}, got {io.layout!r}")
        if not (io.seqlens_k and io.total_sequence_length and io.logits_positions):
            raise BundleError(
                "a gqa-shared decoder section needs seqlens_k, total_sequence_length "
                "and logits_positions input names"
            )
        self.io = io
        self.session = session
        self.session_source = source
        """Where the session came from (prepared-session cache hit, built, off)."""
        self.past_names = io.past_names()
        self.present_names = io.present_names()
        self._output_names = [io.logits] + [n for pair in self.present_names for n in pair]
        self.kv_dtype = self._check_graph()
        self.max_length = int(io.max_length or 0)
        self.vocab_size = self._vocab_size()

    def _check_graph(self) -> type[np.floating]:
        """Fail early unless the graph's I/O matches the manifest; returns the KV dtype."""
        io = self.io
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        wanted_in = [io.input_ids, io.seqlens_k, io.total_sequence_length, io.logits_positions]
        wanted_in += [n for pair in self.past_names for n in pair]
        missing = [n for n in wanted_in if n not in inputs]
        missing += [n for n in self._output_names if n not in outputs]
        if missing:
            raise BundleError(
                f"the ONNX graph lacks inputs/outputs named in the manifest: {missing[:6]}"
            )
        extra = sorted(set(inputs) - {str(n) for n in wanted_in})
        if extra:
            raise BundleError(f"the ONNX graph has inputs the manifest does not describe: {extra}")
        past = inputs[self.past_names[0][0]]
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

    def _vocab_size(self) -> int:
        dim = self.session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise BundleError(f"the logits output has no fixed vocabulary size: {dim!r}")
        return dim

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one position of one row takes (keys and values of every layer)."""
        io = self.io
        return 2 * io.num_layers * io.num_kv_heads * io.head_dim * np.dtype(self.kv_dtype).itemsize

    def buffers(self, batch: int, capacity: int) -> list[np.ndarray]:
        """One layer's worth of fresh KV buffers per layer ``[batch, kv_heads, capacity, head_dim]``."""
        shape = (batch, self.io.num_kv_heads, capacity, self.io.head_dim)
        return [np.empty(shape, dtype=self.kv_dtype) for _ in range(self.io.num_layers)]

    def run(
        self,
        binding: Binding,
        input_ids: np.ndarray,
        past_lengths: np.ndarray,
        positions: np.ndarray,
    ) -> np.ndarray:
        """One graph run over bound buffers; writes the new KV in place.

        Args:
            binding: the buffers ``[batch, kv_heads, capacity, head_dim]`` to read and
                extend; capacity must hold ``past_lengths + seq`` for every row.
            input_ids: ``[batch, seq]`` int64 new tokens (``seq > 1`` only for batch 1
                or rows without a past: a GroupQueryAttention limit).
            past_lengths: ``[batch]`` positions already in each row.
            positions: which new positions to return logits for ``[n]`` int64.

        Returns:
            float32 logits ``[batch, n, vocab]`` (a fresh array).
        """
        batch, seq = input_ids.shape
        if batch > 1 and seq > 1 and past_lengths.any():
            raise InvalidArgumentError(
                "several new tokens after a past need batch 1 (GroupQueryAttention)"
            )
        totals = past_lengths.astype(np.int64) + seq
        total = int(totals.max())
        if total > self.max_length:
            raise ContextLengthError(
                f"{total} positions exceed the graph's max_length {self.max_length}"
            )
        io = self.io
        assert io.seqlens_k and io.total_sequence_length and io.logits_positions
        bound = binding.binding
        bound.bind_cpu_input(io.input_ids, np.ascontiguousarray(input_ids, dtype=np.int64))
        bound.bind_cpu_input(io.seqlens_k, (totals - 1).astype(np.int32))
        bound.bind_cpu_input(io.total_sequence_length, np.array(total, dtype=np.int32))
        bound.bind_cpu_input(io.logits_positions, np.ascontiguousarray(positions, dtype=np.int64))
        logits = np.empty((batch, positions.shape[0], self.vocab_size), dtype=np.float32)
        bound.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(bound)
        return logits

    def all_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Logits of every position ``[batch, seq, vocab]`` from an empty past (scoring).

        Uses private buffers: safe from any thread.
        """
        if attention_mask is not None and not np.all(attention_mask == 1):
            raise InvalidArgumentError("the fused (gqa-shared) graph does not support padding")
        batch, seq = input_ids.shape
        binding = Binding(self, self.buffers(batch, seq), self.buffers(batch, seq))
        return self.run(
            binding, input_ids, np.zeros(batch, dtype=np.int64), np.arange(seq, dtype=np.int64)
        )
