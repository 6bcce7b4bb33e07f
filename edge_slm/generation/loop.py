"""The token loop: prompt ids in, sampled :class:`TokenStep` out (layer 1).

:func:`generate_step` is the one loop every call goes through (after mlx-lm's
``generate_step``): its state is passed in (the backend, the conversation's KV state,
the resolved :class:`DecodeConfig`), nothing is kept on a model. It computes what the
KV state does not already hold of the prompt, then samples, stops and decodes one
token at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np

from edge_slm.errors import ContextLengthError, DeadlineError, InvalidArgumentError
from edge_slm.generation.backends import Backend
from edge_slm.generation.kv_slots import KVState
from edge_slm.generation.options import DecodeConfig
from edge_slm.generation.results import RunStats, TokenStep
from edge_slm.generation.sampling import TokenLogprob, top_logprobs
from edge_slm.generation.speculative import DraftAcceptor, DraftLength, propose
from edge_slm.text.stops import Deadline, FinishReason

_NO_ALTERNATIVES: tuple[TokenLogprob, ...] = ()

PREFILL_CHUNK = 256
"""Prompt tokens computed per forward (see :func:`compute_prompt`)."""


def fit_context(
    prompt_ids: list[int],
    config: DecodeConfig,
    context_length: int,
    bos_token_id: int | None,
) -> tuple[list[int], int]:
    """Check the prompt fits; returns (prompt ids, max new tokens clamped to the room left).

    With ``truncate_prompt`` the oldest tokens are dropped (a leading BOS is kept) so
    that at least one new token fits; otherwise a long prompt raises.
    """
    wanted = config.max_new_tokens
    if not prompt_ids:
        raise InvalidArgumentError("the prompt is empty (it encodes to no tokens)")
    if len(prompt_ids) >= context_length:
        if not config.options.truncate_prompt:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds "
                f"{context_length} (including the tokens to generate); shorten it or pass "
                "truncate_prompt=True"
            )
        keep = max(1, context_length - min(wanted, context_length // 2))
        head = [prompt_ids[0]] if bos_token_id is not None and prompt_ids[0] == bos_token_id else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (keep - len(head)) :]
    return prompt_ids, min(wanted, context_length - len(prompt_ids))


class SamplingState:
    """One sequence's sampling state: history, generated tokens, RNG, limits."""

    def __init__(self, config: DecodeConfig, prompt_ids: Sequence[int], budget: int) -> None:
        self.config = config
        self.budget = budget
        self.history = list(prompt_ids)
        self.generated: list[int] = []
        self.rng = np.random.default_rng(config.options.seed)
        self.deadline: Deadline = config.deadline()
        self.constraint = config.constraint.start() if config.constraint is not None else None
        opts = config.options
        self.acceptor: DraftAcceptor | None = None
        if opts.speculative is not None and opts.temperature:  # greedy needs no rule
            self.acceptor = DraftAcceptor(
                opts.temperature,
                opts.top_k or 0,
                opts.top_p or 1.0,
                opts.min_p or 0.0,
                opts.typical_p or 1.0,
            )

    def sample(self, logits: np.ndarray, draft: int | None = None) -> TokenStep:
        """Process ``logits`` ``[vocab]``, draw a token and say whether the sequence ends.

        With a speculative ``draft`` for this position, a sampling call keeps it by the
        speculative-sampling rule (:class:`DraftAcceptor`); greedy needs nothing: the
        caller keeps the draft when the argmax equals it.
        """
        config = self.config
        row = logits
        if self.constraint is not None:  # first: processors and sampler see allowed tokens only
            row = self.constraint.mask(row, config.stop_ids)
        if config.processors:
            masked = row
            history = np.asarray(self.history, dtype=np.int64)
            generated = np.asarray(self.generated, dtype=np.int64)
            for process in config.processors:
                row = process(history, generated, row)
            if self.constraint is not None and not np.isfinite(row).any():
                row = masked  # the processors banned every allowed token: the constraint wins
        if draft is not None and self.acceptor is not None:
            token = self.acceptor(row, draft, self.rng)
        else:
            token = config.sampler(row, self.rng)
        logprob, alternatives = math.nan, _NO_ALTERNATIVES
        if config.wants_logprob:  # a log-sum-exp over the vocabulary: only when asked
            logprob, alternatives = top_logprobs(row, token, config.logprobs)
        self.generated.append(token)
        self.history.append(token)
        reason: FinishReason | None = None
        if token in config.stop_ids:
            reason = FinishReason.STOP_TOKEN
        elif self.constraint is not None and self.constraint.advance(token):
            reason = FinishReason.CONSTRAINT
        elif len(self.generated) >= self.budget:
            reason = FinishReason.LENGTH
        elif self.deadline.expired():
            reason = FinishReason.DEADLINE
        return TokenStep(token, logprob, alternatives, reason)


def compute_prompt(
    backend: Backend, state: KVState, prompt_ids: list[int], deadline: Deadline
) -> np.ndarray:
    """Run the part of the prompt ``state`` does not hold, in chunks; the last logits.

    Chunks of :data:`PREFILL_CHUNK` tokens keep a long prompt from holding the model
    (other conversations' decode steps run between chunks) and let the deadline
    stop it.

    Raises:
        DeadlineError: the deadline passed before the prompt was computed.
    """
    rest = prompt_ids[len(state.tokens) :]
    logits = np.empty(0, dtype=np.float32)
    for start in range(0, len(rest), PREFILL_CHUNK):
        if start and deadline.expired():
            raise DeadlineError(
                f"the deadline of {deadline.seconds} s passed while computing the prompt "
                f"({len(state.tokens)} of {len(prompt_ids)} tokens done)"
            )
        logits = backend.extend(state, rest[start : start + PREFILL_CHUNK])[-1]
    return logits


def generate_step(
    backend: Backend,
    state: KVState,
    prompt_ids: list[int],
    budget: int,
    config: DecodeConfig,
    stats: RunStats,
) -> Iterator[TokenStep]:
    """Yield generated tokens one by one; the last one carries the finish reason.

    ``state`` must already hold a slot (``backend.begin``) and may hold a prefix of
    ``prompt_ids`` (the caller truncated it to what it shares with the prompt): only
    the rest of the prompt is computed. When the loop ends, ``state`` holds every
    token but the last sampled one, so a later prompt can reuse it.

    With ``speculative`` set, each forward after the first runs the pending token and
    the drafts of :func:`~edge_slm.generation.speculative.propose` together; the
    positions are sampled in turn like plain steps, and the drafts after the first
    one not chosen are cut from ``state`` (its token list always matches its KV).
    """
    sampling = SamplingState(config, prompt_ids, budget)
    stats.prompt_ids = prompt_ids
    stats.reused_prompt_tokens = len(state.tokens)
    opts = config.options
    draft_length = DraftLength(opts.speculative_tokens) if opts.speculative is not None else None
    rows: Sequence[np.ndarray] = [compute_prompt(backend, state, prompt_ids, sampling.deadline)]
    drafts: list[int] = []  # the tokens run after the pending one: rows[i + 1] follows drafts[i]
    while True:
        for i, row in enumerate(rows):
            draft = drafts[i] if i < len(drafts) else None
            step = sampling.sample(row, draft)
            if stats.first_token_at is None:
                stats.first_token_at = time.perf_counter()
            kept = draft is not None and step.token_id == draft and step.finish_reason is None
            if draft is not None and not kept:  # drop the KV of drafts[i:]
                backend.truncate(state, len(state.tokens) - (len(drafts) - i))
            yield step
            if step.finish_reason is not None:
                return
            if not kept:
                if drafts and draft_length is not None:
                    draft_length.update(len(drafts), i)
                break
        drafts = []
        if draft_length is not None:
            room = budget - len(sampling.generated) - 1  # drafts past the budget are unused
            drafts = propose(
                sampling.history, opts.speculative_ngram, min(draft_length.current, room)
            )
        if drafts:
            rows = list(backend.extend(state, [step.token_id, *drafts], all_positions=True))
        else:
            rows = [backend.step(state, step.token_id)]
