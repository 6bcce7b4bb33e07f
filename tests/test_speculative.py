"""Prompt-lookup speculative decoding (edge_slm.generation.speculative).

Greedy: token for token the answer of plain decoding, on tiny random bundles of both
graph layouts (optimum's plain graph and the fused one) and, in the slow test, on the
real SmolLM2-135M; the drafts are really verified (some kept, some rejected) and the KV
state afterwards is the one plain decoding leaves. Sampling: the acceptance rule draws
from the sampler's distribution (checked against it over many draws).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_slm
from edge_slm.errors import InvalidArgumentError
from edge_slm.generation.sampling import make_logits_filter
from edge_slm.generation.speculative import DraftAcceptor, DraftLength, propose
from edge_slm.text.stops import FinishReason

# repetitive prompts: the history offers n-grams to look up from the start
PROMPTS = [
    "one two three four one two three four one two three",
    "the cat sat on the mat and the cat sat on the",
    "Hello world. Hello world. Hello",
]


# --------------------------------------------------------------------------- propose
def test_propose_takes_the_latest_earlier_occurrence() -> None:
    history = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(history, 3, 2) == [7, 8]  # the later "1 2 3" (followed by 7 8)
    assert propose(history, 3, 10) == [7, 8, 5, 1, 2, 3]  # up to the end of the history
    assert propose([4, 5, 6, 4, 5], 2, 3) == [6, 4, 5]


def test_propose_falls_back_to_shorter_ngrams_and_may_find_nothing() -> None:
    assert propose([5, 1, 2, 8, 0, 1, 2], 3, 2) == [8, 0]  # "0 1 2" is new, "1 2" is not
    assert propose([1, 2, 3, 4, 9, 3], 3, 2) == []  # only the 1-gram "3" occurs ...
    assert propose([1, 2, 3, 4, 9, 3], 1, 2) == [4, 9]  # ... used when n = 1
    assert propose([1, 2, 3, 4], 3, 4) == []  # the last token never occurred before
    assert propose([7], 3, 4) == []
    assert propose([1, 2, 1], 2, 0) == []


def test_draft_length_grows_while_drafts_are_kept_and_shrinks_on_a_miss() -> None:
    length = DraftLength(6)
    seen = [length.current]
    for drafted, kept in (
        (6, 2),
        (5, 0),
        (4, 4),
        (6, 6),
        (6, 0),
        (5, 0),
        (4, 0),
        (3, 0),
        (2, 0),
        (1, 0),
    ):
        length.update(drafted, kept)
        seen.append(length.current)
    assert seen == [6, 5, 4, 6, 6, 5, 4, 3, 2, 1, 1]


# ------------------------------------------------------------------- greedy exactness
class Recorder:
    """Counts drafts verified and drafts cut again, by wrapping a backend's methods."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.verified = self.dropped = 0
        extend, truncate = backend.extend, backend.truncate

        def recorded_extend(state: Any, ids: Any, all_positions: bool = False) -> Any:
            if all_positions:
                self.verified += len(ids) - 1
            return extend(state, ids, all_positions)

        def recorded_truncate(state: Any, length: int) -> None:
            self.dropped += max(0, len(state.tokens) - length)
            truncate(state, length)

        monkeypatch.setattr(backend, "extend", recorded_extend)
        monkeypatch.setattr(backend, "truncate", recorded_truncate)


def _check_greedy_identical(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(model.backend, monkeypatch)
    for prompt in PROMPTS:
        for max_new in (1, 7, 40):
            plain = model.generate(prompt, max_new_tokens=max_new, temperature=0.0)
            fast = model.generate(
                prompt, max_new_tokens=max_new, temperature=0.0, speculative="prompt-lookup"
            )
            assert fast.token_ids == plain.token_ids, (prompt, max_new)
            assert (fast.text, fast.finish_reason) == (plain.text, plain.finish_reason)
    # a logit bias that makes one token win every step: its repeats are drafted and kept
    forced = {model.encode(" two", add_special_tokens=False)[0]: 8.0}
    plain = model.generate(PROMPTS[0], max_new_tokens=30, temperature=0.0, logit_bias=forced)
    fast = model.generate(
        PROMPTS[0],
        max_new_tokens=30,
        temperature=0.0,
        logit_bias=forced,
        speculative="prompt-lookup",
    )
    assert fast.token_ids == plain.token_ids
    kept = recorder.verified - recorder.dropped
    assert recorder.verified > 0 and kept > 0 and recorder.dropped > 0, vars(recorder)


@pytest.fixture(scope="module")
def fused_llama(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama as a fused (GroupQueryAttention, shared KV buffer) bundle."""
    from edge_slm_export.decoder import ExportOptions, export_decoder

    folder = tmp_path_factory.mktemp("speculative") / "fused"
    return export_decoder(str(hf_models["llama"]), folder, ExportOptions(graph="fused"))


def test_greedy_is_token_identical_on_the_plain_graph(
    generators: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _check_greedy_identical(generators["llama"], monkeypatch)


def test_greedy_is_token_identical_on_the_fused_graph(
    fused_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _check_greedy_identical(edge_slm.load(fused_llama), monkeypatch)


@pytest.mark.parametrize("layout", ["plain", "fused"])
def test_stops_limits_and_kv_state_match_plain_decoding(
    layout: str, generators: dict[str, Any], fused_llama: Path
) -> None:
    model = generators["llama"] if layout == "plain" else edge_slm.load(fused_llama)
    prompt = PROMPTS[0]
    plain = model.generate(prompt, max_new_tokens=30, temperature=0.0)
    # a stop string inside the answer: the same text and reason
    stop = plain.text[len(plain.text) // 2 :][:3]
    assert stop.strip()
    expected = model.generate(prompt, max_new_tokens=30, temperature=0.0, stop=[stop])
    got = model.generate(
        prompt, max_new_tokens=30, temperature=0.0, stop=[stop], speculative="prompt-lookup"
    )
    assert (got.text, got.finish_reason, got.stop) == (
        expected.text,
        expected.finish_reason,
        expected.stop,
    )
    assert got.finish_reason == FinishReason.STOP_STRING
    # a stop token in the middle of a draft
    token = plain.token_ids[len(plain.token_ids) // 2]
    expected = model.generate(prompt, max_new_tokens=30, temperature=0.0, stop_token_ids=[token])
    got = model.generate(
        prompt,
        max_new_tokens=30,
        temperature=0.0,
        stop_token_ids=[token],
        speculative="prompt-lookup",
        speculative_tokens=8,
    )
    assert got.token_ids == expected.token_ids and got.finish_reason == FinishReason.STOP_TOKEN
    # the KV state afterwards: every token but the last sampled one, as plain decoding
    ids = model.encode(prompt)
    held = []
    for speculative in (None, "prompt-lookup"):
        with model.conversation() as conversation:
            steps = list(
                conversation.generate_tokens(
                    ids, max_new_tokens=23, temperature=0.0, speculative=speculative
                )
            )
            held.append((conversation.cached_tokens, [s.token_id for s in steps]))
    assert held[0] == held[1]
    assert held[0][0] == tuple(ids + held[0][1][:-1])


def test_a_conversation_continues_the_same_after_speculation(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    answers = []
    for speculative in (None, "prompt-lookup"):
        with model.conversation() as conversation:
            first = conversation.generate(
                PROMPTS[1], max_new_tokens=12, temperature=0.0, speculative=speculative
            )
            second = conversation.generate(
                PROMPTS[1] + first.text + " and the cat",
                max_new_tokens=12,
                temperature=0.0,
                speculative=speculative,
            )
            answers.append((first.token_ids, second.token_ids, second.timings.reused_prompt_tokens))
    assert answers[0] == answers[1]


# ------------------------------------------------------------------------- sampling
def test_the_acceptance_rule_draws_from_the_samplers_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    settings = dict(temperature=0.8, top_k=5, top_p=1.0, min_p=0.0, typical_p=1.0)
    filtered = make_logits_filter(**settings)(logits)  # type: ignore[arg-type]
    p = np.exp(filtered) / np.exp(filtered).sum()  # token 5 removed by top_k: p = 0
    accept = DraftAcceptor(**settings)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    draws = 6_000
    for draft in (0, 3, 5):  # likely, unlikely, impossible
        counts = np.bincount([accept(logits, draft, rng) for _ in range(draws)], minlength=6)
        freq = counts / draws
        tolerance = 5 * np.sqrt(p * (1 - p) / draws) + 1e-9
        assert np.all(np.abs(freq - p) <= tolerance), (draft, freq, p)
        assert counts[5] == 0


def test_speculative_sampling_is_seeded_and_keeps_the_limits(generators: dict[str, Any]) -> None:
    model = generators["llama"]
    options = dict(max_new_tokens=25, temperature=0.7, top_k=20, seed=11)
    first = model.generate(PROMPTS[0], speculative="prompt-lookup", **options)
    again = model.generate(PROMPTS[0], speculative="prompt-lookup", **options)
    assert first.token_ids == again.token_ids
    assert len(first.token_ids) <= 25


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"speculative": "medusa"}, "speculative must be None"),
        ({"speculative": "prompt-lookup", "speculative_tokens": 0}, "speculative_tokens"),
        ({"speculative": "prompt-lookup", "speculative_ngram": 99}, "speculative_ngram"),
        ({"speculative_tokens": True}, "speculative_tokens"),
    ],
)
def test_bad_speculative_options_are_typed_errors(
    generators: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        generators["llama"].generate("Hi", max_new_tokens=2, **overrides)


# ----------------------------------------------------------------- real SmolLM2 (slow)
PASSAGE = (
    "Opening hours: the museum is open from 9 am to 6 pm, Tuesday to Sunday, and closed on "
    "Mondays. Tickets cost 12 euros for adults, 8 euros for students and are free for "
    "children under 12. The cafe on the ground floor serves coffee, sandwiches and cakes "
    "until 5 pm. Lockers for bags are next to the entrance and need a 1 euro coin, which "
    "is returned."
)
QUESTIONS = [
    "How much do tickets cost, and when is the museum open?",
    "Summarise the text in two sentences.",
]


@pytest.fixture(scope="module")
def smollm2_bundles(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> list[Path]:
    """SmolLM2-135M: the fused fp32 graph and its GGUF-block 4-bit bundle."""
    from edge_slm_export.decoder import ExportOptions, export_decoder
    from edge_slm_quantize.bundle import quantize_bundle

    root = tmp_path_factory.mktemp("smollm2-speculative")
    fused = export_decoder(str(smollm2_gguf), root / "fused", ExportOptions(graph="fused"))
    return [fused, quantize_bundle(fused, root / "gguf", "gguf")]


@pytest.mark.slow
def test_smollm2_extractive_answers_equal_plain_decoding(
    smollm2_bundles: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32: token for token. 4-bit (GGUF blocks, int8 activations): onnxruntime computes
    a several-token forward slightly differently from a one-token one here (logits up to
    about 1 apart), so the answers may part only where plain decoding's top two logits
    are that close."""
    fused, quantized = smollm2_bundles
    for bundle in (fused, quantized):
        model = edge_slm.load(bundle)
        recorder = Recorder(model.backend, monkeypatch)
        for question in QUESTIONS:
            messages = [
                {"role": "user", "content": f"{PASSAGE}\n\nUsing only this text: {question}"}
            ]
            plain = model.chat(messages, max_new_tokens=96, temperature=0.0, logprobs=2)
            fast = model.chat(
                messages, max_new_tokens=96, temperature=0.0, speculative="prompt-lookup"
            )
            if bundle == fused:
                assert fast.token_ids == plain.token_ids, question
                continue
            parted = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(plain.token_ids, fast.token_ids, strict=False))
                    if a != b
                ),
                None,
            )
            if parted is not None:
                top = plain.logprobs[parted].top_logprobs
                assert top[0].logprob - top[1].logprob < 1.0, (question, parted, top)
        # the answers quote the passage: most drafted tokens are kept
        kept = recorder.verified - recorder.dropped
        assert kept > 0.5 * recorder.verified, (bundle.name, vars(recorder))
        monkeypatch.undo()
