"""Methods that keep a GGUF source's own blocks (``gguf``, ``gguf-small``, ``gguf-head4``).

A bundle exported from a GGUF file holds those weights de-quantized; carrying the file's
blocks into MatMulNBits loses nothing where re-quantizing them on another grid loses
accuracy a second time. The transcoding is :mod:`edge_slm_quantize.gguf`:

* ``gguf``: every weight exactly (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q2_K..Q6_K); a tensor in
  another type (IQ*, ...) is refused naming it;
* ``gguf-small``: the 4-bit-container types (Q4_0, Q4_1, Q2_K, Q3_K, Q4_K) exactly, the
  wider ones (Q5_*, Q6_K, Q8_0, embedding / lm_head included) and unreadable ones
  re-quantized to 4-bit searched blocks from their de-quantized weights;
* ``gguf-head4``: every layer exactly, only the lm_head (and tied embedding) in 4 bits.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from edge_slm.bundle import sha256_file
from edge_slm_quantize.methods.base import (
    Method,
    MethodContext,
    QuantizedGraph,
    share_embedding,
)
from edge_slm_quantize.weight_only import WeightOnlySettings


def gguf_source_path(context: MethodContext) -> Path:
    """The GGUF file a bundle was exported from, its sha256 checked against the provenance.

    Raises:
        GGUFError: the bundle did not come from a GGUF file, the file is missing, or its
            contents changed since the export.
    """
    from edge_slm_quantize.gguf import GGUFError

    provenance = context.manifest.provenance
    if provenance.source_kind != "gguf":
        raise GGUFError(
            f"method 'gguf' transcodes the blocks of the GGUF file a bundle was exported from; "
            f"{str(context.bundle)!r} came from a {provenance.source_kind} source "
            f"({provenance.source!r}); use int4-search or int8"
        )
    path = context.gguf_path or Path(provenance.source)
    if not path.is_file():
        raise GGUFError(
            f"the GGUF source {str(path)!r} recorded in the bundle's provenance is not there "
            "(pass its new location with --gguf PATH)"
        )
    digest = sha256_file(path)
    if provenance.source_sha256 and digest != provenance.source_sha256:
        raise GGUFError(
            f"{str(path)!r} has sha256 {digest}, but the bundle was exported from a file with "
            f"sha256 {provenance.source_sha256}"
        )
    return path


def _check_fused(context: MethodContext) -> None:
    from edge_slm_quantize.gguf import GGUFError

    decoder = context.manifest.decoder
    if decoder is None or decoder.layout != "gqa-shared":
        layout = decoder.layout if decoder else None
        raise GGUFError(
            f"the gguf methods need the fused graph (layout 'gqa-shared'), got {layout!r}: "
            "export with --graph fused"
        )


def _transcode(
    model: onnx.ModelProto,
    settings: WeightOnlySettings,
    logits: str,
    context: MethodContext,
    **options: Any,
) -> QuantizedGraph:
    """The GGUF source's blocks carried into ``model`` (``options`` go to
    ``transcode_gguf``), the embedding shared with the lm_head where they are tied."""
    from edge_slm_quantize.gguf import read_gguf, transcode_gguf

    _check_fused(context)
    source = read_gguf(gguf_source_path(context))
    result = transcode_gguf(model, source, settings, logits=logits, **options)
    return share_embedding(result, logits)


def _gguf(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    return _transcode(model, settings, logits, context)


def _gguf_lm_head4(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    from edge_slm_quantize.search import lm_head_importance

    return _transcode(
        model,
        settings,
        logits,
        context,
        lm_head=replace(settings, bits=4),
        importance=lm_head_importance(model, logits),
    )


def _gguf_small(
    model: onnx.ModelProto, settings: WeightOnlySettings, logits: str, context: MethodContext
) -> QuantizedGraph:
    from edge_slm_quantize.search import lm_head_importance

    return _transcode(
        model,
        settings,
        logits,
        context,
        requantize=replace(settings, bits=4),
        importance=lm_head_importance(model, logits),
    )


METHODS = (
    Method(
        name="gguf-head4",
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4),
        summary="gguf's layer blocks unchanged; the lm_head (and tied embedding) re-quantized "
        "to 4-bit with searched scales (SmolLM2: Q8_0 -> 4-bit saves 13.5 MB)",
        apply=_gguf_lm_head4,
    ),
    Method(
        name="gguf-small",
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=True, accuracy_level=4),
        summary="gguf's 4-bit blocks (Q4_0/Q4_1/Q2_K/Q3_K/Q4_K) unchanged; wider or unreadable "
        "types (Q5_x, Q6_K, Q8_0, IQ*) re-quantized to 4-bit searched blocks (block_size, "
        "symmetric apply to those)",
        apply=_gguf_small,
    ),
    Method(
        name="gguf",
        # bits/block_size describe the usual case (Q4_x); the real types per tensor are
        # in the manifest's details (gguf_tensor_types).
        defaults=WeightOnlySettings(bits=4, block_size=32, symmetric=False, accuracy_level=4),
        summary="the GGUF source's own blocks carried into MatMulNBits exactly (Q4_0/Q4_1/"
        "Q5_0/Q5_1/Q8_0, Q2_K..Q6_K; other types refused); the tied embedding shares the "
        "lm_head's blocks",
        apply=_gguf,
        fixed_blocks=True,
    ),
)
