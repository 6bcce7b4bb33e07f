"""Constrained generation (JSON schema, regex, grammar) on tiny random models.

A tiny random model's free output is noise, so an output that parses is the constraint's
doing, not luck: every generation of many seeded runs must validate. The sampler is also
driven with random logits directly, to check that the mask comes before every filter
(greedy = the best allowed token) and that stop ids wait for a complete output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest

import edge_slm
from edge_slm import ConstraintError, GenerationOptions, Grammar, JsonSchema, Regex
from edge_slm.generation.constraints import ll_tokenizer
from edge_slm.generation.loop import SamplingState
from edge_slm.text.stops import FinishReason

FAMILY = "llama"
COMPLETE = (FinishReason.CONSTRAINT, FinishReason.STOP_TOKEN)

SCHEMAS: dict[str, dict[str, Any]] = {
    "intent": {
        "type": "object",
        "properties": {
            "intent": {"enum": ["book", "cancel", "opening_hours", "directions"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["intent", "confidence"],
        "additionalProperties": False,
    },
    "booking": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
            "guests": {"type": "integer", "minimum": 1, "maximum": 12},
            "date": {"type": "string", "pattern": "^2026-(0[1-9]|1[0-2])-([0-2][0-9]|3[01])$"},
            "vegetarian": {"type": "boolean"},
        },
        "required": ["name", "guests", "date"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "visitor": {
                "type": "object",
                "properties": {
                    "first": {"type": "string", "maxLength": 6},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["first", "age"],
                "additionalProperties": False,
            },
            "rooms": {
                "type": "array",
                "items": {"enum": ["A1", "B2", "C3"]},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["visitor", "rooms"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 2,
        "maxItems": 4,
    },
    "enum": {"enum": ["yes", "no", "maybe"]},
    "optional": {
        "type": "object",
        "properties": {
            "note": {"type": "string", "maxLength": 5},
            "floor": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "additionalProperties": False,
    },
}

REGEXES = {
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]",
    "phone": r"\+44 [0-9]{4} [0-9]{6}",
    "choice": r"(red|green|blue)( and (red|green|blue)){0,2}",
    "code": r"[A-Z]{2}-[0-9]{3}",
}

LARK = """
start: "route(" intent ", " floor ")"
intent: "desk" | "lift" | "cafe"
floor: /[0-9]/
"""
GBNF = 'root ::= "gate " [A-D] [1-9]'


@pytest.fixture(scope="module")
def model(generators: dict[str, Any]) -> Any:
    return generators[FAMILY]


def run(model: Any, constraint: Any, seed: int, **options: Any) -> Any:
    options = {"temperature": 1.0, "max_new_tokens": 100, **options}
    return model.generate("Visitor:", constraint=constraint, seed=seed, **options)


# ------------------------------------------------------------- outputs validate
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sampled_output_validates_against_its_schema(model: Any, name: str) -> None:
    schema = SCHEMAS[name]
    for seed in range(12):
        result = run(model, JsonSchema(schema, compact=True), seed)
        assert result.finish_reason in COMPLETE, (seed, result.text, result.finish_reason)
        jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.parametrize("name", ["enum", "numbers", "intent"])
def test_default_whitespace_is_bounded(model: Any, name: str) -> None:
    """Without ``compact`` the model picks the whitespace (at most 16 characters a gap):
    a random model wastes tokens on it but still completes a short schema."""
    schema = SCHEMAS[name]
    for seed in range(8):
        result = run(model, JsonSchema(schema), seed, max_new_tokens=110)
        assert result.finish_reason in COMPLETE, (seed, result.text)
        jsonschema.validate(json.loads(result.text), schema)
        assert not re.search(r"\s{17}", result.text)


def test_unconstrained_output_is_noise(model: Any) -> None:
    """The control: the same model without a constraint does not produce the JSON."""
    texts = [run(model, None, seed, max_new_tokens=30).text for seed in range(12)]
    parsed = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), SCHEMAS["booking"])
            parsed += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert parsed == 0


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_every_sampled_output_matches_its_regex(model: Any, name: str) -> None:
    pattern = REGEXES[name]
    for seed in range(12):
        result = run(model, Regex(pattern), seed)
        assert result.finish_reason in COMPLETE, (seed, result.text)
        assert re.fullmatch(pattern, result.text), (seed, result.text)


@pytest.mark.parametrize(
    ("grammar", "pattern"),
    [(LARK, r"route\((desk|lift|cafe), [0-9]\)"), (GBNF, r"gate [A-D][1-9]")],
    ids=["lark", "gbnf"],
)
def test_every_sampled_output_parses_with_its_grammar(
    model: Any, grammar: str, pattern: str
) -> None:
    for seed in range(12):
        result = run(model, Grammar(grammar), seed)
        assert result.finish_reason in COMPLETE
        assert re.fullmatch(pattern, result.text), (seed, result.text)


def test_json_object_is_any_object(model: Any) -> None:
    for seed in range(6):
        result = run(model, JsonSchema(), seed, max_new_tokens=200, top_k=20)
        if result.finish_reason in COMPLETE:
            assert isinstance(json.loads(result.text), dict)
        else:  # cut by the limit: never reported as done
            assert result.finish_reason is FinishReason.LENGTH


def test_every_sampler_setting_composes(model: Any) -> None:
    schema = SCHEMAS["booking"]
    settings = [
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.8},
        {"temperature": 1.0, "min_p": 0.05},
        {"temperature": 1.0, "typical_p": 0.9},
        {"temperature": 1.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
        {"temperature": 1.0, "no_repeat_ngram_size": 2, "presence_penalty": 1.0},
        {"temperature": 1.0, "logprobs": 5},
    ]
    for i, setting in enumerate(settings):
        result = run(model, JsonSchema(schema, compact=True), seed=i, **setting)
        assert result.finish_reason in COMPLETE, setting
        jsonschema.validate(json.loads(result.text), schema)


def test_same_seed_same_text(model: Any) -> None:
    constraint = JsonSchema(SCHEMAS["nested"], compact=True)
    first = run(model, constraint, seed=7)
    again = run(model, constraint, seed=7)
    assert (first.text, first.token_ids) == (again.text, again.token_ids)
    assert {run(model, constraint, seed=s).text for s in range(6)} != {first.text}


# ---------------------------------------------- the mask composes with the sampler
def _reference(model: Any, grammar: str) -> Any:
    return llguidance.LLMatcher(ll_tokenizer(model), grammar, log_level=0)


def _allowed(matcher: Any, vocab: int) -> np.ndarray:
    bits = np.unpackbits(
        np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little"
    )
    return bits[:vocab].astype(bool)


def test_greedy_picks_the_best_allowed_token(model: Any) -> None:
    """Random logits through the loop's sampling state vs masking them by hand."""
    schema = SCHEMAS["booking"]
    vocab = model.manifest.vocab_size
    eos = set(model.manifest.special_tokens.eos_token_ids)
    rng = np.random.default_rng(0)
    for trial in range(5):
        config = model.decode_config(
            GenerationOptions(constraint=JsonSchema(schema), temperature=0.0, max_new_tokens=999)
        )
        state = SamplingState(config, [1, 2, 3], budget=999)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,16}"}
        )
        reference = _reference(model, grammar)
        tokens: list[int] = []
        while True:
            logits = rng.standard_normal(vocab).astype(np.float32) * 4
            allowed = _allowed(reference, vocab)
            allowed[list(eos)] = reference.is_accepting()
            expected = int(np.argmax(np.where(allowed, logits, -np.inf)))
            step = state.sample(logits)
            assert step.token_id == expected, (trial, len(tokens))
            tokens.append(step.token_id)
            if step.finish_reason is not None:
                break
            assert reference.consume_token(step.token_id)
        assert step.finish_reason in COMPLETE
        text = model.decode([t for t in tokens if t not in eos])
        jsonschema.validate(json.loads(text), schema)


def test_stop_ids_wait_for_a_complete_output(model: Any) -> None:
    """Logits that always favour the end-of-sequence token: it comes exactly at the end."""
    eos = model.manifest.special_tokens.eos_token_ids[0]
    config = model.decode_config(
        GenerationOptions(constraint=Regex("[0-9]{3}"), temperature=0.0, max_new_tokens=20)
    )
    state = SamplingState(config, [1], budget=20)
    rng = np.random.default_rng(1)
    steps = []
    while not steps or steps[-1].finish_reason is None:
        logits = rng.standard_normal(model.manifest.vocab_size).astype(np.float32)
        logits[eos] = 100.0
        steps.append(state.sample(logits))
    text = model.decode([s.token_id for s in steps])
    assert re.fullmatch("[0-9]{3}", text)
    # "[0-9]{3}" cannot grow after three digits: the constraint ends it, no EOS needed.
    assert steps[-1].finish_reason is FinishReason.CONSTRAINT


def test_eos_ends_an_open_ended_pattern_only_once_it_matches(model: Any) -> None:
    eos = model.manifest.special_tokens.eos_token_ids[0]
    config = model.decode_config(
        GenerationOptions(constraint=Regex("[a-z]{2,}"), temperature=0.0, max_new_tokens=50)
    )
    state = SamplingState(config, [1], budget=50)
    rng = np.random.default_rng(2)
    steps = []
    while not steps or steps[-1].finish_reason is None:
        logits = rng.standard_normal(model.manifest.vocab_size).astype(np.float32)
        logits[eos] = 100.0
        steps.append(state.sample(logits))
    assert steps[-1].finish_reason is FinishReason.STOP_TOKEN
    assert steps[-1].token_id == eos
    assert re.fullmatch("[a-z]{2,}", model.decode([s.token_id for s in steps[:-1]]))


# ------------------------------------------------ limits: length, stop strings
def test_a_schema_that_cannot_finish_in_the_budget_ends_with_length(model: Any) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 40}
    result = run(model, JsonSchema(schema), seed=0, max_new_tokens=10)
    assert result.finish_reason is FinishReason.LENGTH
    assert len(result.token_ids) == 10
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(result.text), schema)


def test_stop_strings_still_cut(model: Any) -> None:
    result = run(model, Regex("(ab|cd){20}"), seed=3, stop=["cd"])
    assert result.finish_reason is FinishReason.STOP_STRING
    assert "cd" not in result.text and re.fullmatch("(ab)*a?", result.text)


def test_max_new_tokens_cuts_a_regex(model: Any) -> None:
    result = run(model, Regex("x{50}"), seed=0, max_new_tokens=7)
    assert result.finish_reason is FinishReason.LENGTH
    assert len(result.token_ids) == 7 and set(result.text) == {"x"}


# ------------------------------------------------------- every entry point
def test_stream_chat_and_conversation(model: Any) -> None:
    constraint = JsonSchema(SCHEMAS["intent"], compact=True)
    messages = [{"role": "user", "content": "Where is the lift?"}]
    chunks = list(model.stream_chat(messages, constraint=constraint, seed=1, temperature=1.0))
    text = "".join(c.text for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMAS["intent"])
    assert chunks[-1].finish_reason in COMPLETE
    assert model.chat(messages, constraint=constraint, seed=1, temperature=1.0).text == text
    with model.conversation() as conversation:
        first = conversation.chat(messages, constraint=constraint, seed=1, temperature=1.0)
        assert first.text == text
        follow = [*messages, {"role": "assistant", "content": text}]
        follow.append({"role": "user", "content": "Open?"})
        second = conversation.chat(follow, constraint=Regex("(yes|no)"), seed=2, max_new_tokens=4)
        assert second.text in ("yes", "no")
        streamed = "".join(
            c.text for c in conversation.stream("Code:", constraint=Regex("[0-9]{4}"))
        )
        assert re.fullmatch("[0-9]{4}", streamed)


@pytest.mark.parametrize("graph", ["plain", "fused"])
def test_generate_batch_constrains_every_row(
    graph: str, model: Any, fused_bundles: dict[str, Path]
) -> None:
    batch_model = model if graph == "plain" else edge_slm.load(fused_bundles[FAMILY])
    schema = SCHEMAS["booking"]
    prompts = ["Book:", "A table for two", "Name?", "x"]
    results = batch_model.generate_batch(
        prompts, constraint=JsonSchema(schema, compact=True), temperature=1.0, seed=5
    )
    for prompt, result in zip(prompts, results, strict=True):
        assert result.finish_reason in COMPLETE
        jsonschema.validate(json.loads(result.text), schema)
        alone = batch_model.generate(
            prompt, constraint=JsonSchema(schema, compact=True), temperature=1.0, seed=5
        )
        assert alone.text == result.text


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (JsonSchema({"type": "strin"}), "strin"),
        (JsonSchema('{"type": '), "not valid JSON"),
        (JsonSchema({"type": "object", "required": 3}), "required"),
        (Regex("[a-z"), "unclosed character class"),
        (Grammar("start: foo"), "foo"),
        (Grammar("root ::= [a-"), "grammar"),
    ],
)
def test_invalid_constraints_raise_a_typed_error(model: Any, constraint: Any, words: str) -> None:
    with pytest.raises(ConstraintError, match=re.escape(words)):
        model.generate("x", constraint=constraint)


def test_constraint_arguments_are_checked() -> None:
    with pytest.raises(edge_slm.InvalidArgumentError):
        Regex("")
    with pytest.raises(edge_slm.InvalidArgumentError):
        JsonSchema(3)  # type: ignore[arg-type]
    with pytest.raises(edge_slm.InvalidArgumentError):
        Grammar(None)  # type: ignore[arg-type]


def test_a_constraint_of_the_wrong_type_is_refused(model: Any) -> None:
    with pytest.raises(edge_slm.InvalidArgumentError, match="JsonSchema, Regex or Grammar"):
        model.generate("x", constraint={"type": "object"})


def test_without_llguidance_the_error_names_the_extra(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)
    monkeypatch.setitem(sys.modules, "llguidance.numpy", None)
    with pytest.raises(ConstraintError, match=re.escape("pip install 'edge-slm[structured]'")):
        model.generate("x", constraint=Regex("a+"))
    assert model.generate("x", max_new_tokens=2).text is not None  # no constraint: fine


def test_import_edge_slm_does_not_import_llguidance() -> None:
    code = "import sys, edge_slm; assert 'llguidance' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_threads_share_the_model_and_its_tokenizer(model: Any) -> None:
    """The LLTokenizer is built once per model; each call's matcher is its own."""
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> str:
        name = sorted(SCHEMAS)[seed % len(SCHEMAS)]
        result = run(model, JsonSchema(SCHEMAS[name], compact=True), seed)
        assert result.finish_reason in COMPLETE
        jsonschema.validate(json.loads(result.text), SCHEMAS[name])
        return str(result.text)

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, range(8)))
    assert together == [one(seed) for seed in range(8)]
    assert ll_tokenizer(model) is ll_tokenizer(model)


def test_cli_json_schema_and_regex(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_slm.cli.main import main

    schema_file = tmp_path / "booking.json"
    schema_file.write_text(json.dumps(SCHEMAS["booking"]))
    bundle = str(bundles[FAMILY])
    args = ["--temperature", "1", "--seed", "3", "--max-new-tokens", "100", "--json"]
    assert main(["generate", bundle, "Book:", "--json-schema", str(schema_file), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] in ("constraint", "stop_token")
    jsonschema.validate(json.loads(out["text"]), SCHEMAS["booking"])
    assert main(["chat", bundle, "Gate?", "--regex", "[A-D][1-9]", *args]) == 0
    assert re.fullmatch("[A-D][1-9]", json.loads(capsys.readouterr().out)["text"])
