"""The registry of quantization methods: a name on the CLI and in the manifest -> how.

A method pairs default settings with the function that applies them to a graph, so a
new method (e.g. mixed precision per tensor, a quantized embedding) is one more entry
here and needs no change in :mod:`quantize.bundle` or the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx

from quantize.errors import UnknownMethodError
from quantize.weight_only import WeightOnlyResult, WeightOnlySettings, quantize_weights

# (graph with weights loaded, settings, logits output name) -> quantized graph and facts
Apply = Callable[[onnx.ModelProto, WeightOnlySettings, str], WeightOnlyResult]


def _weight_only(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str
) -> WeightOnlyResult:
    return quantize_weights(model, settings, logits=logits)


@dataclass(frozen=True)
class Method:
    """A registered quantization method: its defaults, a one-line summary, its function."""

    name: str
    defaults: WeightOnlySettings
    summary: str
    apply: Apply

    def settings(
        self,
        *,
        block_size: int | None = None,
        symmetric: bool | None = None,
        accuracy_level: int | None = None,
    ) -> WeightOnlySettings:
        """The method's defaults with the given overrides (None keeps the default)."""
        chosen = self.defaults
        if block_size is not None:
            chosen = replace(chosen, block_size=block_size)
        if symmetric is not None:
            chosen = replace(chosen, symmetric=symmetric)
        if accuracy_level is not None:
            chosen = replace(chosen, accuracy_level=accuracy_level)
        return chosen


METHODS: dict[str, Method] = {
    "int8": Method(
        name="int8",
        # accuracy_level 4 (int8 activations) is the fast CPU kernel: on SmolLM2-135M the
        # fp32-compute path (level 0) decoded about 10x slower than level 4.
        defaults=WeightOnlySettings(bits=8, block_size=32, symmetric=False, accuracy_level=4),
        summary="8-bit weight-only MatMulNBits, block 32, asymmetric, int8 activations",
        apply=_weight_only,
    ),
    "int4": Method(
        name="int4",
        # Asymmetric with block 32 matches the Q4_1 layout SmolLM2's GGUF weights came
        # from; accuracy_level 4 lets the CPU kernel use int8 activations (fast).
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4),
        summary="4-bit weight-only MatMulNBits, block 32, asymmetric, int8 activations",
        apply=_weight_only,
    ),
}


def get_method(name: str) -> Method:
    """The registered method called ``name``; UnknownMethodError names the allowed ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown quantization method {name!r}; allowed: {sorted(METHODS)}"
        ) from None
