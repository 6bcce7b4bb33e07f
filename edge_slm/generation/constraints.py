"""Constrained generation: JSON schema, regular expression and grammar (llguidance).

A caller puts one of :class:`JsonSchema`, :class:`Regex` or :class:`Grammar` in
``GenerationOptions.constraint``. :func:`compile_constraint` turns it, once per call,
into a :class:`CompiledConstraint` (a validated llguidance matcher in its start state)
against the model's :class:`llguidance.LLTokenizer`, which is built from the bundle's
``tokenizer.json`` once per model and shared (it is immutable). Every generated
sequence gets its own :class:`ConstraintState` (a copy of the matcher): the token loop
asks it for the mask of allowed tokens before the processors and the sampler, and
feeds it each sampled token.

llguidance is an optional dependency (``pip install 'edge-slm[structured]'``), imported
here only when a constraint is used, so ``import edge_slm`` never loads it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_slm.errors import ConstraintError, InvalidArgumentError

if TYPE_CHECKING:
    from edge_slm.generation.model import TextGenerator

__all__ = [
    "EXTRA_HINT",
    "CompiledConstraint",
    "Constraint",
    "ConstraintState",
    "Grammar",
    "JsonSchema",
    "Regex",
    "compile_constraint",
    "ll_tokenizer",
]

EXTRA_HINT = "pip install 'edge-slm[structured]'"
"""How to install what constrained generation needs (named in the error without it)."""


JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,16}"}
"""llguidance's JSON options: at most 16 whitespace characters between two JSON tokens
(llguidance's default allows any run, which a small model can fill until its token
limit). A schema's ``"x-guidance"`` object overrides them."""


@dataclass(frozen=True)
class JsonSchema:
    """The output is one JSON value valid against ``schema``.

    Args:
        schema: a JSON schema as a dict or as JSON text; None means any JSON object
            (OpenAI's ``{"type": "json_object"}``). Whitespace between JSON tokens is
            the model's choice, at most 16 characters (:data:`JSON_OPTIONS`).
        compact: no whitespace at all between JSON tokens (``{"a":1,"b":[2,3]}``): the
            fewest tokens, though a model that was about to pretty-print is steered
            off its habit.
    """

    schema: Mapping[str, Any] | str | None = None
    compact: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.compact, bool):
            raise InvalidArgumentError(f"compact must be True or False, got {self.compact!r}")
        if self.schema is not None and not isinstance(self.schema, (Mapping, str)):
            raise InvalidArgumentError(
                f"a JSON schema must be a dict or its JSON text, got {type(self.schema).__name__}"
            )


@dataclass(frozen=True)
class Regex:
    """The whole output matches ``pattern`` (Rust ``regex`` syntax, implicitly anchored)."""

    pattern: str

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise InvalidArgumentError(f"a regex must be a non-empty string, got {self.pattern!r}")


@dataclass(frozen=True)
class Grammar:
    """The output is a sentence of ``grammar``: Lark (llguidance's dialect, start rule
    ``start``) or a llama.cpp GBNF grammar (start rule ``root``), told apart by syntax."""

    grammar: str

    def __post_init__(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise InvalidArgumentError(
                f"a grammar must be a non-empty string, got {self.grammar!r}"
            )


Constraint = JsonSchema | Regex | Grammar
CONSTRAINT_TYPES = (JsonSchema, Regex, Grammar)


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # the bitmask helpers
    except ImportError as error:
        raise ConstraintError(
            f"constrained generation (JSON schema, regex, grammar) needs llguidance: {EXTRA_HINT}"
        ) from error
    return llguidance


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _byte_level_json(text: str) -> str:
    """``tokenizer.json`` with a decoder llguidance reads as byte-level when it is one.

    GGUF-derived tokenizers (SmolLM2's) chain ``ByteFallback, Fuse, Replace, ByteLevel``;
    llguidance then takes the ByteFallback for a SentencePiece vocabulary and reads
    ``Ġ`` literally. On a byte-level BPE vocabulary the other steps do nothing, so the
    ByteLevel step alone decodes the same bytes.
    """
    data = json.loads(text)
    decoder = data.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        steps = decoder.get("decoders") or []
        byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
        if byte_level:
            data["decoder"] = byte_level[0]
            return json.dumps(data)
    return text


def ll_tokenizer(model: TextGenerator) -> Any:
    """The model's :class:`llguidance.LLTokenizer` (built on first use, ~0.5 s, cached).

    LLTokenizer is immutable once built: one per model, shared by every thread.

    Raises:
        ConstraintError: llguidance is missing, or it reads this tokenizer differently
            from the ``tokenizers`` library (a mask would then be wrong).
    """
    llg = _llguidance()
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(model)
        if cached is not None:
            return cached
        manifest = model.manifest
        path = Path(model.folder) / manifest.files["tokenizer"]
        text = _byte_level_json(path.read_text(encoding="utf-8"))
        eos = list(manifest.special_tokens.eos_token_ids)
        try:
            built = llg.LLTokenizer(text, n_vocab=manifest.vocab_size, eos_token=eos or None)
        except Exception as error:  # llguidance raises plain ValueError/RuntimeError
            raise ConstraintError(f"llguidance cannot read {path}: {error}") from error
        probe = 'Hello, world! {"name": "Ana", "n": [1, 2.5]}\n  café 東京'
        ids = model.encode(probe, add_special_tokens=False)
        if built.decode_bytes(ids) != model.decode(ids).encode("utf-8"):
            raise ConstraintError(
                f"llguidance reads the tokenizer {path} differently from the tokenizers "
                "library; constrained generation is not available for this bundle"
            )
        _TOKENIZERS[model] = built
        return built


def _grammar_text(llg: Any, constraint: Constraint) -> str:
    matcher = llg.LLMatcher
    if isinstance(constraint, JsonSchema):
        schema: Any = constraint.schema
        if schema is None:
            schema = {"type": "object"}
        elif isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ConstraintError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"a JSON schema must be an object, got {schema!r}")
        try:
            options = {"whitespace_flexible": False} if constraint.compact else JSON_OPTIONS
            return str(matcher.grammar_from_json_schema(dict(schema), defaults=options))
        except (ValueError, TypeError) as error:
            raise ConstraintError(f"invalid JSON schema: {error}") from None
    if isinstance(constraint, Regex):
        return str(matcher.grammar_from_regex(constraint.pattern))
    try:
        return str(llg.grammar_from("grammar", constraint.grammar))  # Lark or GBNF
    except ValueError as error:
        raise ConstraintError(f"invalid grammar: {error}") from None


def _kind(constraint: Constraint) -> str:
    if isinstance(constraint, JsonSchema):
        return "JSON schema"
    return "regex" if isinstance(constraint, Regex) else "grammar"


def compile_constraint(constraint: Constraint, model: TextGenerator) -> CompiledConstraint:
    """Compile ``constraint`` against ``model``'s tokenizer (once per call).

    Raises:
        ConstraintError: llguidance is missing, or the schema, regex or grammar is
            invalid (the message says where).
    """
    if not isinstance(constraint, CONSTRAINT_TYPES):
        raise InvalidArgumentError(
            f"constraint must be a JsonSchema, Regex or Grammar, got {type(constraint).__name__}"
        )
    llg = _llguidance()
    tokenizer = ll_tokenizer(model)
    grammar = _grammar_text(llg, constraint)
    matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"invalid {_kind(constraint)}: {matcher.get_error().strip()}")
    return CompiledConstraint(matcher, int(model.manifest.vocab_size))


class CompiledConstraint:
    """A validated matcher in its start state; :meth:`start` copies it per sequence."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def start(self) -> ConstraintState:
        """A fresh state for one generated sequence."""
        return ConstraintState(self._matcher.deep_copy(), self.vocab_size)


class ConstraintState:
    """One sequence's matcher: the allowed tokens now, and the tokens consumed so far."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.bitmask = allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(vocab / 32)]

    def allowed(self, vocab: int, stop_ids: Collection[int]) -> np.ndarray:
        """bool ``[vocab]``: the tokens the constraint allows next.

        Stop ids (end of sequence and the caller's stop tokens) are allowed exactly
        when the output so far is complete.
        """
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask)
        bits = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")
        allowed = bits[:vocab].astype(bool)
        if stop_ids:
            ids = np.fromiter((t for t in stop_ids if t < vocab), dtype=np.int64)
            allowed[ids] = self.matcher.is_accepting()
        if not allowed.any():
            detail = self.matcher.get_error() or "no token can continue the output"
            raise ConstraintError(f"the constraint allows no next token: {detail}")
        return allowed

    def mask(self, logits: np.ndarray, stop_ids: Collection[int]) -> np.ndarray:
        """``logits`` ``[vocab]`` with every token the constraint forbids at -inf (a copy)."""
        allowed = self.allowed(logits.shape[-1], stop_ids)
        return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)

    def advance(self, token_id: int) -> bool:
        """Consume a sampled (non-stop) token; True when nothing may follow it."""
        if not self.matcher.consume_token(token_id):
            raise ConstraintError(
                f"the constraint rejected token {token_id}: {self.matcher.get_error()}"
            )
        return bool(self.matcher.is_stopped())

    @property
    def complete(self) -> bool:
        """Whether the output so far is a complete match."""
        return bool(self.matcher.is_accepting())
