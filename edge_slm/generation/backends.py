"""The KV-cache side of a decoder, per graph layout, behind one interface.

The conversation layer (:mod:`edge_slm.generation.conversation`) drives a
:class:`Backend` with its own :class:`~edge_slm.generation.kv_slots.KVState`:
``begin``/``finish`` a call, ``truncate`` to a reusable prefix, ``extend`` by prompt
tokens, ``step`` one token at a time, ``release`` at the end. The model shares one
backend between all its conversations; each call touches only its own state.

* :class:`PlainBackend` (optimum layout): each state owns its KV arrays; steps of
  several threads run concurrently in onnxruntime.
* :class:`FusedBackend` (gqa-shared layout): states own rows of one
  :class:`~edge_slm.generation.kv_pool.KVPool`; every forward goes through a
  :class:`~edge_slm.generation.step_scheduler.StepScheduler`, which runs the decode
  steps of conversations on different threads as one batched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_slm.engine.session import LoadOptions
from edge_slm.errors import CapacityError
from edge_slm.generation.fused_step import FusedDecoder
from edge_slm.generation.kv_pool import KVPool
from edge_slm.generation.kv_slots import KVState, SlotTable
from edge_slm.generation.plain_step import PlainDecoder
from edge_slm.generation.step_scheduler import StepRequest, StepScheduler


@dataclass(frozen=True)
class Capacity:
    """How much of a model's conversation capacity is in use (for monitoring).

    Attributes:
        live_sessions: conversations holding KV memory (generating or idle).
        generating: conversations in a call right now.
        waiting: calls waiting for a free slot.
        max_sessions: the most conversations that may hold KV memory at once.
        kv_bytes: KV memory allocated now.
        max_kv_bytes: the KV memory limit (None: none).
        batches: forwards run by the step scheduler so far (fused graphs; else 0).
        batched_steps: decode steps those forwards carried (their ratio is the mean
            batch size).
    """

    live_sessions: int
    generating: int
    waiting: int
    max_sessions: int
    kv_bytes: int
    max_kv_bytes: int | None
    batches: int = 0
    batched_steps: int = 0


class PlainBackend:
    """KV arrays per state; see the module docstring."""

    def __init__(self, decoder: PlainDecoder, options: LoadOptions) -> None:
        self.decoder = decoder
        self.table = SlotTable(options.max_sessions, options.wait_s)
        self.max_kv_bytes = options.max_kv_bytes

    def begin(self, state: KVState) -> None:
        """A call starts on ``state`` (takes a slot; see :class:`SlotTable`)."""
        self.table.acquire(state)

    def finish(self, state: KVState) -> None:
        """The call on ``state`` ended; its KV stays for reuse."""
        self.table.finish(state)

    def release(self, state: KVState) -> None:
        """``state`` is closed: free its KV."""
        self.table.release(state)

    def truncate(self, state: KVState, length: int) -> None:
        """Keep the first ``length`` positions of ``state``."""
        state.tokens = state.tokens[:length]
        if state.cache is not None:
            state.cache = state.cache.truncated(length)

    def kv_bytes(self) -> int:
        """KV memory held by every state."""
        return sum(s.cache.nbytes for s in self.table.snapshot().values() if s.cache is not None)

    def _check_room(self, state: KVState, new_positions: int) -> None:
        if self.max_kv_bytes is None:
            return
        wanted = self.kv_bytes() + new_positions * self.decoder.bytes_per_position
        if wanted > self.max_kv_bytes:
            raise CapacityError(
                f"the KV memory would grow to {wanted} bytes, over max_kv_bytes="
                f"{self.max_kv_bytes}; use shorter prompts or answers, fewer conversations, "
                "or a larger max_kv_bytes"
            )

    def extend(self, state: KVState, ids: Sequence[int], all_positions: bool = False) -> np.ndarray:
        """Run ``ids`` after ``state``'s KV; logits ``[len(ids) or 1, vocab]``."""
        self._check_room(state, len(ids))
        cache = state.cache if state.cache is not None else self.decoder.empty_cache(1)
        logits, state.cache = self.decoder.forward(
            np.asarray([ids], dtype=np.int64), cache, all_positions=all_positions
        )
        state.tokens.extend(int(t) for t in ids)
        return logits[0] if all_positions else logits

    def step(self, state: KVState, token: int) -> np.ndarray:
        """Decode one token after ``state``; logits ``[vocab]``."""
        return np.asarray(self.extend(state, [token])[0])

    def step_many(self, states: Sequence[KVState], tokens: Sequence[int]) -> list[np.ndarray]:
        """One decode step for each state (one after the other on this layout)."""
        return [self.step(s, t) for s, t in zip(states, tokens, strict=True)]

    def load(
        self,
        state: KVState,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        tokens: Sequence[int],
    ) -> None:
        """Set ``state``'s KV from saved arrays ``[1, kv_heads, n, head_dim]``."""
        self._check_room(state, len(tokens))
        ids = np.asarray([tokens], dtype=np.int64)
        state.cache = self.decoder.cache_from_arrays(
            [k.copy() for k in keys], [v.copy() for v in values], ids
        )
        state.tokens = [int(t) for t in tokens]

    def export(self, state: KVState) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of ``state``'s keys and values ``[1, kv_heads, n, head_dim]``."""
        assert state.cache is not None
        return [k.copy() for k in state.cache.keys], [v.copy() for v in state.cache.values]

    def capacity(self) -> Capacity:
        """Slots and memory in use."""
        table = self.table
        return Capacity(
            table.live,
            table.generating,
            table.waiting,
            table.max_sessions,
            self.kv_bytes(),
            self.max_kv_bytes,
        )


class FusedBackend:
    """Pool rows per state, forwards through the step scheduler; see the module docstring."""

    def __init__(self, decoder: FusedDecoder, options: LoadOptions, pad_token_id: int) -> None:
        self.decoder = decoder
        self.table = SlotTable(options.max_sessions, options.wait_s)
        self.pool = KVPool(decoder, options.max_kv_bytes)
        self.scheduler = StepScheduler(self._run_batch, options.batch_window_s)
        self.pad_token_id = pad_token_id

    def begin(self, state: KVState) -> None:
        """A call starts on ``state`` (takes a slot; see :class:`SlotTable`)."""
        self.table.acquire(state)

    def finish(self, state: KVState) -> None:
        """The call on ``state`` ended; its KV stays for reuse."""
        self.table.finish(state)
        self.scheduler.leave()

    def release(self, state: KVState) -> None:
        """``state`` is closed: its row goes back; the pool is freed when none is held."""
        with self.scheduler.exclusive():
            self.table.release(state)
            if self.table.live == 0:
                self.pool.free()
        self.scheduler.leave()

    def truncate(self, state: KVState, length: int) -> None:
        """Keep the first ``length`` positions (the rest of the row becomes scratch)."""
        state.tokens = state.tokens[:length]

    def kv_bytes(self) -> int:
        """KV memory allocated by the pool."""
        return self.pool.nbytes

    def extend(self, state: KVState, ids: Sequence[int], all_positions: bool = False) -> np.ndarray:
        """Run ``ids`` after ``state``'s KV; logits ``[len(ids) or 1, vocab]``."""
        request = StepRequest("prefill", state, list(ids), all_positions)
        self.scheduler.submit([request])
        return np.asarray(request.result)

    def step(self, state: KVState, token: int) -> np.ndarray:
        """Decode one token after ``state`` (batched with other threads'); ``[vocab]``."""
        request = StepRequest("decode", state, [token])
        self.scheduler.submit([request])
        return np.asarray(request.result)

    def step_many(self, states: Sequence[KVState], tokens: Sequence[int]) -> list[np.ndarray]:
        """One decode step for each state, as one batched forward."""
        requests = [StepRequest("decode", s, [t]) for s, t in zip(states, tokens, strict=True)]
        self.scheduler.submit(requests)
        return [np.asarray(r.result) for r in requests]

    def load(
        self,
        state: KVState,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        tokens: Sequence[int],
    ) -> None:
        """Copy saved arrays ``[1, kv_heads, n, head_dim]`` into ``state``'s row."""
        assert state.slot is not None
        with self.scheduler.exclusive():
            self.pool.write(state.slot, keys, values)
            state.tokens = [int(t) for t in tokens]

    def export(self, state: KVState) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of ``state``'s keys and values ``[1, kv_heads, n, head_dim]``."""
        assert state.slot is not None
        with self.scheduler.exclusive():
            return self.pool.read(state.slot, len(state.tokens))

    def capacity(self) -> Capacity:
        """Slots and memory in use, and how well decode steps batch."""
        table, scheduler = self.table, self.scheduler
        return Capacity(
            table.live,
            table.generating,
            table.waiting,
            table.max_sessions,
            self.kv_bytes(),
            self.pool.max_bytes,
            scheduler.batches,
            scheduler.batched_steps,
        )

    # ------------------------------------------------------------- the leader's work
    def _run_batch(self, requests: list[StepRequest]) -> None:
        """Prefills one by one, then every decode step in one forward (run lock held)."""
        decodes = []
        for request in requests:
            if request.state.slot is None:  # its call was abandoned and its slot given back
                request.error = CapacityError("this conversation no longer holds KV memory")
                continue
            if request.kind == "decode":
                decodes.append(request)
                continue
            try:
                request.result = self._prefill(request)
            except Exception as exc:  # this request fails; the others go on
                request.error = exc
        if decodes:
            self._decode(decodes)

    def _prefill(self, request: StepRequest) -> np.ndarray:
        state, ids = request.state, list(request.token_ids)
        assert state.slot is not None
        past, seq = len(state.tokens), len(ids)
        self.pool.ensure(state.slot + 1, past + seq)
        positions = np.arange(seq) if request.all_positions else np.asarray([seq - 1])
        logits = self.decoder.run(
            self.pool.binding(state.slot, state.slot + 1),
            np.asarray([ids], dtype=np.int64),
            np.asarray([past], dtype=np.int64),
            positions,
        )
        state.tokens.extend(ids)
        return np.asarray(logits[0])  # [positions, vocab]

    def _decode(self, requests: list[StepRequest]) -> None:
        """One forward over the rows from the lowest to the highest slot stepping.

        Rows in that range that are not stepping get a padding token written at their
        first free position (scratch they overwrite when they next step; a full row
        gets it at its last position, which prefix reuse never keeps), so they cost
        a little compute and change nothing.
        """
        slots = [r.state.slot for r in requests]
        low, high = min(slots), max(slots) + 1
        holders = self.table.snapshot()
        last = self.decoder.max_length - 1
        lengths = np.zeros(high - low, dtype=np.int64)
        for row in range(low, high):
            holder = holders.get(row)
            lengths[row - low] = min(len(holder.tokens), last) if holder is not None else 0
        ids = np.full((high - low, 1), self.pad_token_id, dtype=np.int64)
        for request in requests:
            assert request.state.slot is not None
            ids[request.state.slot - low, 0] = request.token_ids[0]
            lengths[request.state.slot - low] = len(request.state.tokens)
        self.pool.ensure(high, int(lengths.max()) + 1)
        logits = self.decoder.run(self.pool.binding(low, high), ids, lengths, np.asarray([0]))
        for request in requests:
            row = request.state.slot - low
            request.state.tokens.append(int(request.token_ids[0]))
            request.result = logits[row, 0]


Backend = PlainBackend | FusedBackend
"""The KV side of either graph layout."""


def make_backend(
    decoder: PlainDecoder | FusedDecoder, options: LoadOptions, pad_token_id: int
) -> Backend:
    """The KV side that fits ``decoder``'s layout."""
    if isinstance(decoder, FusedDecoder):
        return FusedBackend(decoder, options, pad_token_id)
    return PlainBackend(decoder, options)


def greedy_continuation(
    decoder: PlainDecoder | FusedDecoder, prompt_ids: Sequence[int], count: int
) -> list[int]:
    """``count`` greedy tokens after ``prompt_ids`` through the KV-cache path (prefill,
    then one token per step): what the build stage validates a graph with."""
    backend = make_backend(decoder, LoadOptions(max_sessions=1), 0)
    state = KVState()
    backend.begin(state)
    try:
        tokens = [int(np.argmax(backend.extend(state, list(prompt_ids))[-1]))]
        while len(tokens) < count:
            tokens.append(int(np.argmax(backend.step(state, tokens[-1]))))
        return tokens
    finally:
        backend.finish(state)
        backend.release(state)
