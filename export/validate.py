"""Check an exported decoder graph against the torch model it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import DecoderIO, Validation
from edge_slm.generation.backends import greedy_continuation
from edge_slm.generation.decoders import open_decoder
from edge_slm_export.errors import ValidationError

VALIDATION_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "Q: What is 12 times 7?\nA:",
)


def validate_decoder(
    model_path: Path,
    io: DecoderIO,
    torch_model: Any,
    tokenizer: Any,
    tolerance: float,
    greedy_tokens: int = 8,
) -> Validation:
    """Compare ONNX and torch logits on fixed prompts, then a short greedy run.

    Raises:
        ValidationError: the largest absolute logit difference exceeds ``tolerance``.
    """
    import torch

    onnx_model = open_decoder(model_path, io)
    worst = 0.0
    greedy_match = True
    for prompt in VALIDATION_PROMPTS:
        ids = np.asarray([tokenizer(prompt)["input_ids"]], dtype=np.int64)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(ids)).logits.float().numpy()
        got = onnx_model.all_logits(ids)
        worst = max(worst, float(np.abs(expected - got).max()))
        # Greedy continuation: torch recomputes the whole sequence each step, ONNX goes
        # through the KV-cache path (prefill, then one token per step).
        reference: list[int] = []
        sequence = torch.from_numpy(ids)
        with torch.no_grad():
            for _ in range(greedy_tokens):
                token = int(torch_model(sequence).logits[0, -1].argmax())
                reference.append(token)
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        ours = greedy_continuation(onnx_model, ids[0].tolist(), greedy_tokens)
        greedy_match = greedy_match and ours == reference
    if worst > tolerance:
        raise ValidationError(
            f"ONNX logits differ from torch by {worst:.3g} > tolerance {tolerance:g} "
            "(max absolute difference over the validation prompts)"
        )
    return Validation(
        max_abs_logit_diff=worst,
        tolerance=tolerance,
        prompts=len(VALIDATION_PROMPTS),
        greedy_tokens_match=greedy_match,
    )
