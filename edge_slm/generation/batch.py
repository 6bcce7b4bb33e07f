"""Several prompts in one call: one forward per step for all rows.

On the plain graph rows are left-padded into one batch; on the fused graph each row
gets its own KV state and the decode steps of all rows run as one batched forward
(rows of different lengths, each with its own past length). Each row stops on its own
and gets its own finish reason; with a seed each row samples from its own generator,
so a row's output does not depend on the other rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_slm.generation import limits
from edge_slm.generation.backends import FusedBackend
from edge_slm.generation.chunks import TextChunker
from edge_slm.generation.kv_slots import KVState
from edge_slm.generation.loop import SamplingState, compute_prompt, fit_context
from edge_slm.generation.options import DecodeConfig
from edge_slm.generation.plain_step import PlainDecoder
from edge_slm.generation.results import Chunk, GenerationResult, RunStats, assemble_result

if TYPE_CHECKING:
    from edge_slm.generation.model import TextGenerator


class _Row:
    def __init__(self, model: TextGenerator, prompt: str, config: DecodeConfig) -> None:
        manifest = model.manifest
        self.ids, budget = fit_context(
            model.encode(prompt),
            config,
            manifest.context_length,
            manifest.special_tokens.bos_token_id,
        )
        self.sampling = SamplingState(config, self.ids, budget)
        self.text = TextChunker(model.tokenizer, config.stop_strings)
        self.chunks: list[Chunk] = []
        self.done = False

    def push(self, logits: np.ndarray) -> int:
        """Sample from ``logits`` ``[vocab]``; returns the token."""
        step = self.sampling.sample(logits)
        chunk = self.text.push(step)
        if chunk is not None:
            self.chunks.append(chunk)
            self.done = chunk.finish_reason is not None
        return step.token_id


def generate_batch(
    model: TextGenerator, prompts: Sequence[str], config: DecodeConfig
) -> list[GenerationResult]:
    """Generate for every prompt; see :meth:`TextGenerator.generate_batch`."""
    limits.check_length("prompts", prompts, limits.MAX_BATCH_PROMPTS, "MAX_BATCH_PROMPTS")
    start = time.perf_counter()
    rows = [_Row(model, prompt, config) for prompt in prompts]
    backend = model.backend
    if isinstance(backend, FusedBackend):
        group = backend.table.max_sessions  # rows beyond it run in later groups
        first_token_at = min(
            _fused(backend, rows[i : i + group]) for i in range(0, len(rows), group)
        )
    else:
        assert isinstance(model.decoder, PlainDecoder)
        pad = model.manifest.special_tokens.pad_token_id or 0
        group = model.backend.table.max_sessions  # bounded memory, as on the fused graph
        first_token_at = min(
            _padded(model.decoder, rows[i : i + group], pad) for i in range(0, len(rows), group)
        )
    end = time.perf_counter()
    results = []
    for row in rows:
        stats = RunStats(prompt_ids=row.ids, first_token_at=first_token_at)
        results.append(
            assemble_result(row.chunks, stats, model.load_s, start, end, config.logprobs > 0)
        )
    return results


def _fused(backend: FusedBackend, rows: list[_Row]) -> float:
    """Each row in its own KV state; decode steps of all live rows in one forward."""
    states = [KVState() for _ in rows]
    began: list[KVState] = []
    try:
        for state in states:
            backend.begin(state)
            began.append(state)
        tokens = [
            row.push(compute_prompt(backend, state, row.ids, row.sampling.deadline))
            for row, state in zip(rows, states, strict=True)
        ]
        first_token_at = time.perf_counter()
        while True:
            live = [i for i, row in enumerate(rows) if not row.done]
            if not live:
                return first_token_at
            logits = backend.step_many([states[i] for i in live], [tokens[i] for i in live])
            for i, row_logits in zip(live, logits, strict=True):
                tokens[i] = rows[i].push(row_logits)
    finally:
        for state in began:
            backend.finish(state)
            backend.release(state)


def _padded(decoder: PlainDecoder, rows: list[_Row], pad: int) -> float:
    """Rows left-padded into one batch; one forward per step for all rows."""
    width = max(len(r.ids) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)  # [B, width]
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row.ids) :] = row.ids
        mask[i, width - len(row.ids) :] = 1
    logits, cache = decoder.forward(ids, decoder.empty_cache(len(rows)), mask)
    first_token_at = None
    while True:
        next_ids = np.full((len(rows), 1), pad, dtype=np.int64)
        next_mask = np.zeros((len(rows), 1), dtype=np.int64)
        for i, row in enumerate(rows):
            if row.done:
                continue
            next_ids[i, 0] = row.push(logits[i])
            next_mask[i, 0] = 0 if row.done else 1
        first_token_at = first_token_at or time.perf_counter()
        if all(row.done for row in rows):
            return first_token_at
        logits, cache = decoder.forward(next_ids, cache, next_mask)
