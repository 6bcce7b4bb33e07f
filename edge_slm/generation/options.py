"""Per-call generation options, resolved once into the plain config the loop runs with.

:class:`GenerationOptions` is what a caller writes (None means "the bundle's default",
as in piper's SynthesisConfig). :func:`resolve_options` fills the defaults from the
manifest, validates every value once, and builds the sampler, the history-aware
processors and the stop-token set: a :class:`DecodeConfig`. The per-token code then
trusts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from edge_slm.bundle import GenerationDefaults
from edge_slm.errors import InvalidArgumentError
from edge_slm.generation import limits
from edge_slm.generation.constraints import CONSTRAINT_TYPES, CompiledConstraint, Constraint
from edge_slm.generation.sampling import (
    LogitsProcessor,
    Sampler,
    make_logits_processors,
    make_sampler,
)
from edge_slm.generation.speculative import check_options as check_speculative
from edge_slm.text.stops import Deadline, StopStringMatcher, make_stop_token_ids

MAX_LOGPROBS = 20
"""The most alternatives ``logprobs`` may ask for (OpenAI's cap, also ours)."""


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call generation settings; None means "the bundle's default".

    Sampling is greedy when ``temperature`` is 0. When ``temperature`` is None the
    bundle's default applies: its ``temperature`` if its generation_config samples,
    greedy otherwise.

    ``constraint`` (a :class:`~edge_slm.JsonSchema`, :class:`~edge_slm.Regex` or
    :class:`~edge_slm.Grammar`; needs ``edge-slm[structured]``) masks every token the
    output could not continue with, before the processors and the sampler
    (docs/structured-output.md).

    ``logprobs`` (as in llama-cpp-python): None computes no log-probability (each
    :class:`~edge_slm.generation.results.TokenStep` carries NaN; the decode loop then
    does only what sampling needs), 0 the chosen token's, n also its n likeliest
    alternatives.

    ``speculative="prompt-lookup"`` drafts up to ``speculative_tokens`` tokens by finding
    the last ``speculative_ngram`` tokens earlier in the prompt and answer, and verifies
    them in one forward (:mod:`edge_slm.generation.speculative`): greedy keeps a draft
    only where it is the argmax, sampling keeps the sampler's distribution. Off (None)
    by default. The tokens equal plain decoding's where the graph computes a
    several-token forward as it does one token (fp32 graphs); the quantized SmolLM2
    graphs round differently and may part at near-ties (docs/performance.md).
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: Mapping[int, float] | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    deadline_s: float | None = None
    logprobs: int | None = None
    truncate_prompt: bool = False
    constraint: Constraint | None = None
    speculative: str | None = None
    speculative_tokens: int = 4
    speculative_ngram: int = 3

    @classmethod
    def build(
        cls, options: GenerationOptions | None, overrides: Mapping[str, Any]
    ) -> GenerationOptions:
        """``options`` (or the defaults) with keyword ``overrides``; unknown names raise."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown generation option(s) {unknown}; allowed: {sorted(names)}"
            )
        if options is not None and not isinstance(options, GenerationOptions):
            raise InvalidArgumentError(
                f"options must be a GenerationOptions, got {type(options).__name__}"
            )
        return replace(options or cls(), **overrides)


@dataclass(frozen=True)
class DecodeConfig:
    """Everything one call generates with: resolved, validated, built once.

    Attributes:
        options: the options with every None replaced by the bundle's default.
        sampler: ``(logits, rng) -> token id`` (greedy when temperature is 0).
        processors: the history-aware logits processors at a non-neutral setting.
        stop_ids: the bundle's end-of-sequence ids and the caller's stop token ids.
        stop_strings: the stop strings (checked by the text layer).
        constraint: the compiled constraint (each sequence starts its own state), if any.
    """

    options: GenerationOptions
    sampler: Sampler
    processors: tuple[LogitsProcessor, ...]
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    constraint: CompiledConstraint | None = None

    @property
    def max_new_tokens(self) -> int:
        """The token limit (before clamping to the room left in the context)."""
        return int(self.options.max_new_tokens or 0)

    @property
    def logprobs(self) -> int:
        """How many alternatives to report per token (0: none)."""
        return self.options.logprobs or 0

    @property
    def wants_logprob(self) -> bool:
        """Whether the chosen token's log-probability is computed (``logprobs`` set)."""
        return self.options.logprobs is not None

    def deadline(self) -> Deadline:
        """A fresh deadline for one call (its clock starts now)."""
        return Deadline(self.options.deadline_s)


def _defaults_filled(options: GenerationOptions, defaults: GenerationDefaults) -> GenerationOptions:
    temperature = options.temperature
    if temperature is None:
        wants_sampling = defaults.do_sample or any(
            v is not None for v in (options.top_k, options.top_p, options.min_p, options.typical_p)
        )
        temperature = (defaults.temperature or 1.0) if wants_sampling else 0.0

    def pick(value: Any, default: Any) -> Any:
        return value if value is not None else default

    return replace(
        options,
        max_new_tokens=pick(options.max_new_tokens, defaults.max_new_tokens),
        temperature=temperature,
        top_k=pick(options.top_k, defaults.top_k or 0),
        top_p=pick(options.top_p, defaults.top_p or 1.0),
        min_p=pick(options.min_p, defaults.min_p or 0.0),
        typical_p=pick(options.typical_p, 1.0),
        repetition_penalty=pick(options.repetition_penalty, defaults.repetition_penalty or 1.0),
    )


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidArgumentError(f"{name} must be {allowed}, got {value}")
    return value


def _check_lists(opts: GenerationOptions) -> None:
    """Every per-call list within :mod:`edge_slm.generation.limits`, before it is read."""
    limits.check_length("stop", opts.stop, limits.MAX_STOP_STRINGS, "MAX_STOP_STRINGS")
    for i, text in enumerate(opts.stop):
        if isinstance(text, str) and len(text) > limits.MAX_STOP_STRING_CHARS:
            raise InvalidArgumentError(
                f"stop[{i}] has {len(text)} characters, more than the limit of "
                f"{limits.MAX_STOP_STRING_CHARS} (edge_slm.generation.limits.MAX_STOP_STRING_CHARS)"
            )
    limits.check_length(
        "stop_token_ids", opts.stop_token_ids, limits.MAX_STOP_TOKEN_IDS, "MAX_STOP_TOKEN_IDS"
    )
    if opts.logit_bias is not None:
        limits.check_length("logit_bias", opts.logit_bias, limits.MAX_LOGIT_BIAS, "MAX_LOGIT_BIAS")


def resolve_options(
    options: GenerationOptions,
    defaults: GenerationDefaults,
    vocab_size: int,
    eos_token_ids: Sequence[int],
) -> DecodeConfig:
    """Fill ``options``' None fields from the bundle's defaults, validate, build.

    Raises:
        InvalidArgumentError: a value is of the wrong type or outside its range (the
            message names the option and what is allowed).
    """
    opts = _defaults_filled(options, defaults)
    _check_int("max_new_tokens", opts.max_new_tokens, 1)
    if opts.logprobs is not None:
        _check_int("logprobs", opts.logprobs, 0, MAX_LOGPROBS)
    if opts.seed is not None:
        _check_int("seed", opts.seed, 0)
    if isinstance(opts.stop, str):
        raise InvalidArgumentError(f"stop must be a list of strings, got the string {opts.stop!r}")
    _check_lists(opts)
    if not isinstance(opts.truncate_prompt, bool):
        raise InvalidArgumentError(
            f"truncate_prompt must be True or False, got {opts.truncate_prompt!r}"
        )
    if opts.constraint is not None and not isinstance(opts.constraint, CONSTRAINT_TYPES):
        raise InvalidArgumentError(
            "constraint must be a JsonSchema, Regex or Grammar (edge_slm), "
            f"got {type(opts.constraint).__name__}"
        )
    stop_strings = StopStringMatcher(list(opts.stop)).stop_strings if opts.stop else ()
    Deadline(opts.deadline_s)  # validates the value; each call starts its own clock
    check_speculative(opts.speculative, opts.speculative_tokens, opts.speculative_ngram)
    stop_ids = make_stop_token_ids(opts.stop_token_ids)
    for token_id in sorted(stop_ids):
        if token_id >= vocab_size:
            raise InvalidArgumentError(
                f"stop token id {token_id} outside the vocabulary [0, {vocab_size})"
            )
    sampler = make_sampler(
        temperature=opts.temperature,  # type: ignore[arg-type]  # filled above
        top_k=opts.top_k,  # type: ignore[arg-type]
        top_p=opts.top_p,  # type: ignore[arg-type]
        min_p=opts.min_p,  # type: ignore[arg-type]
        typical_p=opts.typical_p,  # type: ignore[arg-type]
    )
    processors = make_logits_processors(
        repetition_penalty=opts.repetition_penalty,  # type: ignore[arg-type]
        frequency_penalty=opts.frequency_penalty,
        presence_penalty=opts.presence_penalty,
        no_repeat_ngram_size=opts.no_repeat_ngram_size,
        logit_bias=opts.logit_bias,
        vocab_size=vocab_size,
    )
    return DecodeConfig(
        options=opts,
        sampler=sampler,
        processors=tuple(processors),
        stop_ids=frozenset(eos_token_ids) | stop_ids,
        stop_strings=tuple(stop_strings),
    )
