"""Check an exported encoder bundle against the torch model it came from.

The bundle is run through the runtime's own path (:class:`edge_slm.encoder.EncoderModel`:
``tokenizer.json``, dynamic padding, the graph), the torch model through transformers'
tokenizer and forward, on fixed single texts, text pairs and a padded batch. Token ids
must be identical (else the bundle's tokenizer is not the model's) and every output
value within the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_slm.bundle import Validation
from edge_slm.encoders.encoder import EncoderModel, TextInput
from edge_slm_export.errors import ValidationError

VALIDATION_TEXTS: tuple[TextInput, ...] = (
    "I loved this film, the acting was wonderful.",
    "Terrible service.",
    "Where is the nearest train station, and how late does it open on Sundays?",
    ("How do I reset my password?", "Open the settings page and choose 'forgot password'."),
    "Café, naïve, 東京 😀",
)

# (torch model, transformers encoding) -> numpy output [batch, ...]
TorchForward = Callable[[Any, Any], np.ndarray]


def validate_encoder(
    runtime: EncoderModel,
    torch_model: Any,
    tokenizer: Any,
    forward: TorchForward,
    tolerance: float,
    texts: Sequence[TextInput] = VALIDATION_TEXTS,
) -> Validation:
    """Compare runtime and torch outputs on ``texts`` one by one and as one padded batch.

    Raises:
        ValidationError: token ids differ, or the largest absolute output difference
            exceeds ``tolerance``.
    """
    import torch

    worst = 0.0
    groups: list[list[TextInput]] = [[t] for t in texts]
    groups.append([t for t in texts if isinstance(t, str)])  # one batch, padded by both
    for group in groups:
        first = group[0]
        if isinstance(first, tuple):
            encoding = tokenizer(first[0], first[1], return_tensors="pt")
        else:
            encoding = tokenizer(list(group), padding=True, return_tensors="pt")
        batch = runtime.encode(group, truncation="error")
        if not np.array_equal(encoding["input_ids"].numpy(), batch.input_ids):
            raise ValidationError(
                f"the bundle's tokenizer.json encodes {group[0]!r} as "
                f"{batch.input_ids.tolist()}, transformers as {encoding['input_ids'].tolist()}"
            )
        with torch.no_grad():
            expected = forward(torch_model, encoding)
        got = runtime.run(batch)
        if expected.shape != got.shape:
            raise ValidationError(f"ONNX output shape {got.shape} != torch {expected.shape}")
        worst = max(worst, float(np.abs(expected - got).max()))
    if worst > tolerance:
        raise ValidationError(
            f"ONNX outputs differ from torch by {worst:.3g} > tolerance {tolerance:g} "
            "(max absolute difference over the validation texts)"
        )
    return Validation(max_abs_logit_diff=worst, tolerance=tolerance, prompts=len(groups))
