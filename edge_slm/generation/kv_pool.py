"""The fused graph's KV memory: one buffer per layer, one row per conversation slot.

Each layer's keys and values live in ``[rows, kv_heads, capacity, head_dim]`` buffers;
a conversation owns row ``slot``. Rows are contiguous, so a solo step binds its own
row ``[slot:slot+1]`` and a batched decode step binds a range of rows, each with its
own past length. Memory grows to need: rows up to the highest slot in use, capacity
by doubling from :data:`MIN_CAPACITY` positions up to the graph's ``max_length``
(one copy per growth, none per token), and all of it is freed when no conversation
holds a slot. Only the step scheduler's run lock holder touches a pool.
"""

from __future__ import annotations

import numpy as np

from edge_slm.errors import CapacityError
from edge_slm.generation.fused_step import Binding, FusedDecoder

MIN_CAPACITY = 256
CAPACITY_STEP = 64


class KVPool:
    """Rows of KV buffers for a fused decoder; see the module docstring."""

    def __init__(self, decoder: FusedDecoder, max_bytes: int | None) -> None:
        self.decoder = decoder
        self.max_bytes = max_bytes
        self.keys: list[np.ndarray] = []  # per layer [rows, kv_heads, capacity, head_dim]
        self.values: list[np.ndarray] = []
        self.rows = 0
        self.capacity = 0
        self._bindings: dict[tuple[int, int], Binding] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of KV buffers allocated."""
        return self.rows * self.capacity * self.decoder.bytes_per_position

    def ensure(self, rows: int, capacity: int) -> None:
        """Grow (copying what is stored) to at least ``rows`` x ``capacity`` positions.

        Raises:
            CapacityError: the grown pool would pass ``max_bytes``.
        """
        if rows <= self.rows and capacity <= self.capacity:
            return
        new_rows = max(rows, self.rows)
        new_capacity = self.capacity
        if capacity > self.capacity:
            grown = max(capacity, 2 * self.capacity, MIN_CAPACITY)
            grown = -(-grown // CAPACITY_STEP) * CAPACITY_STEP
            new_capacity = max(capacity, min(grown, self.decoder.max_length))
        wanted = new_rows * new_capacity * self.decoder.bytes_per_position
        if self.max_bytes is not None and wanted > self.max_bytes:
            raise CapacityError(
                f"the KV memory would grow to {wanted} bytes ({new_rows} conversations x "
                f"{new_capacity} positions), over max_kv_bytes={self.max_bytes}; use shorter "
                "prompts or answers, fewer conversations, or a larger max_kv_bytes"
            )
        keys = self.decoder.buffers(new_rows, new_capacity)
        values = self.decoder.buffers(new_rows, new_capacity)
        for new, old in zip(keys + values, self.keys + self.values, strict=False):
            new[: self.rows, :, : self.capacity] = old
        self.keys, self.values = keys, values
        self.rows, self.capacity = new_rows, new_capacity
        self._bindings.clear()

    def binding(self, start: int, stop: int) -> Binding:
        """The rows ``[start, stop)`` bound as past and present (cached per range)."""
        binding = self._bindings.get((start, stop))
        if binding is None:
            binding = Binding(
                self.decoder,
                [k[start:stop] for k in self.keys],
                [v[start:stop] for v in self.values],
            )
            self._bindings[(start, stop)] = binding
        return binding

    def write(self, row: int, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Store saved arrays ``[1, kv_heads, n, head_dim]`` at the start of ``row``."""
        n = keys[0].shape[2]
        self.ensure(row + 1, n)
        for buffer, array in zip(self.keys + self.values, keys + values, strict=True):
            buffer[row, :, :n] = array[0]

    def read(self, row: int, length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of ``row``'s first ``length`` positions ``[1, kv_heads, length, head_dim]``."""
        return (
            [k[row : row + 1, :, :length].copy() for k in self.keys],
            [v[row : row + 1, :, :length].copy() for v in self.values],
        )

    def free(self) -> None:
        """Drop every buffer (no conversation holds a slot)."""
        self.keys, self.values = [], []
        self.rows = self.capacity = 0
        self._bindings.clear()
