"""Block quantization with searched scales: lower weight error than round-to-nearest.

onnxruntime's MatMulNBits quantizer (and onnxruntime-genai's builder) rounds each block to
the nearest code with the scale fixed by the block's extreme values. For each block this
module instead tries a grid of candidate scales, rounds with each, re-fits the scale by
least squares for the codes it got, and keeps the candidate with the smallest squared
error (the approach of llama.cpp's ``make_qx_quants``; no calibration data is needed).
An optional per-input-channel ``importance`` (e.g. the mean square of the activations that
multiply the weight) weights the error, so the channels that matter most are kept best.

Scales are rounded to float16 before the codes are chosen, so a bundle can store them in
2 bytes (``Cast`` to float32 at load) with no further error.

Layouts (``w`` a weight, ``s`` its block's scale, ``q`` its code):

* symmetric 4-bit: ``w = s * (q - 8)``, ``q`` in 0..15 (MatMulNBits' default zero point);
* asymmetric 4-bit: ``w = s * (q - z)``, ``q`` and the integer zero point ``z`` in 0..15;
* symmetric 8-bit: ``w = s * (q - 128)``, ``q`` in 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_slm_quantize.blocks import Blocks, BlockWriter
from edge_slm_quantize.errors import QuantizationError
from edge_slm_quantize.graph_passes import fold_weight_transposes, rewrite_gemms
from edge_slm_quantize.weight_only import (
    MatMulCensus,
    WeightOnlySettings,
    census,
    census_details,
    logits_producer,
)

_MS = "com.microsoft"

# Candidate divisors of the block's extreme value for a symmetric block (the code the
# extreme lands on): nmax - 0.1 * i for i in -9..9 as llama.cpp tries, plus a wider
# sweep downwards, where clipping a rare outlier pays for finer steps elsewhere.
_SYMMETRIC_STEPS = np.arange(-9, 31, dtype=np.float32) * np.float32(0.1)
# Asymmetric: shrink the block's [min, max] range from both ends by these fractions.
_SHRINK = np.linspace(0.0, 0.3, 16, dtype=np.float32)
_ROWS_PER_CHUNK = 256


def _as_fp16(values: np.ndarray) -> np.ndarray:
    """Round to the nearest float16 value (kept as float32), never to 0 or inf."""
    tiny = np.float32(np.finfo(np.float16).tiny)
    clipped = np.clip(values, tiny, np.float32(np.finfo(np.float16).max))
    return clipped.astype(np.float16).astype(np.float32)


def _symmetric(x: np.ndarray, h: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``[..., block]`` (uint8, zero point 2**(bits-1)) and scales ``[...]``."""
    half = 1 << (bits - 1)
    # The extreme value by magnitude, with its sign: it may take the code -half (the
    # longer side of the two's-complement range), as onnxruntime's quantizer does.
    index = np.abs(x).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(x, index, axis=-1)[..., 0]
    best_err = np.full(x.shape[:-1], np.inf, dtype=np.float32)
    best_q = np.zeros(x.shape, dtype=np.int8 if bits == 4 else np.int16)
    best_s = np.zeros(x.shape[:-1], dtype=np.float32)
    for step in _SYMMETRIC_STEPS:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(extreme != 0, -(half - step) / extreme, 0.0).astype(np.float32)
        q = np.clip(np.rint(x * inv[..., None]), -half, half - 1)
        hq = h * q
        num = (hq * x).sum(-1)
        den = (hq * q).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(den > 0, num / den, 0.0).astype(np.float32)
        s = _as_fp16(np.abs(s)) * np.sign(s)
        # Codes again for the stored (fp16) scale, then the error they leave.
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_s = np.where(s != 0, 1.0 / s, 0.0).astype(np.float32)
        q = np.clip(np.rint(x * inv_s[..., None]), -half, half - 1)
        err = (h * (x - s[..., None] * q) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_q = np.where(better[..., None], q, best_q)
    # The scale may be negative (the extreme took the code -half): MatMulNBits takes it.
    codes = (best_q.astype(np.int16) + half).astype(np.uint8)
    zero_block = best_s == 0
    if zero_block.any():  # an all-zero block: any scale, code = zero point
        best_s = np.where(zero_block, np.float32(1.0), best_s)
        codes[zero_block] = half
    return codes, best_s


def _asymmetric4(x: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit codes, scales and integer zero points for ``w = s * (q - z)``: the block's
    [min, max] range shrunk from either end, the candidate with the least error kept.
    (A least-squares refit per candidate, tried too, cost 4x the time for 0.01% less
    error on SmolLM2's weights.)"""
    lo0, hi0 = x.min(-1), x.max(-1)
    lo0, hi0 = np.minimum(lo0, 0.0), np.maximum(hi0, 0.0)  # 0 stays representable
    best_err = np.full(x.shape[:-1], np.inf, dtype=np.float32)
    best_q = np.zeros(x.shape, dtype=np.uint8)
    best_s = np.ones(x.shape[:-1], dtype=np.float32)
    best_z = np.zeros(x.shape[:-1], dtype=np.uint8)
    for shrink_lo in _SHRINK:
        for shrink_hi in _SHRINK:
            lo, hi = lo0 * (1 - shrink_lo), hi0 * (1 - shrink_hi)
            span = hi - lo
            s = _as_fp16(np.where(span > 0, span / 15.0, 1.0).astype(np.float32))
            z = np.clip(np.rint(-lo / s), 0, 15)
            q = np.clip(np.rint(x / s[..., None]) + z[..., None], 0, 15)
            err = (h * (x - s[..., None] * (q - z[..., None])) ** 2).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z).astype(np.uint8)
            best_q = np.where(better[..., None], q, best_q).astype(np.uint8)
    return best_q, best_s, best_z


def quantize_blocks(
    weight: np.ndarray,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    importance: np.ndarray | None = None,
) -> Blocks:
    """Quantize ``weight [K, N]`` (a MatMul's B) into blocks along K with searched scales.

    Args:
        weight: float weights, ``y = x @ weight``.
        bits: 4 or 8 (8 is symmetric only).
        block_size: weights per scale along K; K must be a multiple of it.
        symmetric: no zero points (``w = s * (q - 8)``) when True.
        importance: ``[K]`` non-negative weights of the squared error per input
            channel (None: all 1).

    Raises:
        QuantizationError: unsupported bits/layout, K not a multiple of the block, or a
            bad importance vector.
    """
    if bits not in (4, 8) or (bits == 8 and not symmetric):
        raise QuantizationError(
            f"searched scales support 4-bit (symmetric or not) and symmetric 8-bit, got "
            f"bits={bits}, symmetric={symmetric}"
        )
    k, n = weight.shape
    if k % block_size:
        raise QuantizationError(f"K={k} is not a multiple of the block size {block_size}")
    blocks = k // block_size
    if importance is None:
        importance = np.ones(k, dtype=np.float32)
    importance = np.asarray(importance, dtype=np.float32)
    if importance.shape != (k,) or not np.all(np.isfinite(importance)) or importance.min() < 0:
        raise QuantizationError(f"importance must be {k} finite values >= 0")
    h_all = np.maximum(importance, np.float32(1e-8) * max(float(importance.max()), 1e-30))
    h_all = h_all.reshape(1, blocks, block_size)
    rows = np.ascontiguousarray(weight.T, dtype=np.float32).reshape(n, blocks, block_size)
    codes = np.empty(rows.shape, dtype=np.uint8)
    scales = np.empty((n, blocks), dtype=np.float32)
    zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.uint8)
    for start in range(0, n, _ROWS_PER_CHUNK):
        part = rows[start : start + _ROWS_PER_CHUNK]
        end = start + part.shape[0]
        if symmetric:
            codes[start:end], scales[start:end] = _symmetric(part, h_all, bits)
        else:
            codes[start:end], scales[start:end], zero[start:end] = _asymmetric4(part, h_all)
    return Blocks(bits, codes, scales, zero, None, (f"searched-{'sym' if symmetric else 'asym'}",))


@dataclass
class SearchedResult:
    """The quantized graph and the facts the manifest records about it."""

    model: onnx.ModelProto
    settings: WeightOnlySettings
    census: MatMulCensus
    lm_head: str
    bits: dict[str, int] = field(default_factory=dict)  # weight -> bits
    weighted: bool = False  # importance-weighted error (calibration activations)
    gemms_rewritten: int = 0
    folded_transposes: tuple[str, ...] = ()

    def details(self) -> dict[str, Any]:
        """JSON-ready facts for ``Quantization.details``."""
        widths = sorted(set(self.bits.values()))
        return {
            **census_details(self.census),
            "gemms_rewritten": self.gemms_rewritten,
            "lm_head": "quantized" if self.lm_head == "MatMulNBits" else f"float ({self.lm_head})",
            "blocks": (
                "searched scales (least squares over "
                f"{len(_SYMMETRIC_STEPS) if self.settings.symmetric else len(_SHRINK) ** 2} "
                "candidates per block"
                + (", error weighted by calibration activations" if self.weighted else "")
                + "), scales stored as float16"
            ),
            "bits_per_weight": {
                str(b): sum(1 for v in self.bits.values() if v == b) for b in widths
            },
        }


def quantize_graph(
    model: onnx.ModelProto,
    settings: WeightOnlySettings,
    *,
    logits: str = "logits",
    bits_for: dict[str, int] | None = None,
    importance: dict[str, np.ndarray] | None = None,
) -> SearchedResult:
    """Replace every constant MatMul weight of ``model`` by MatMulNBits with searched scales.

    Args:
        model: an fp32 decoder graph with its weights loaded (changed in place).
        settings: bits, block size, symmetry and accuracy level (8-bit is symmetric).
        logits: name of the logits output (to report whether the lm_head got quantized).
        bits_for: per-weight bit widths overriding ``settings.bits`` (e.g. an 8-bit
            lm_head), keyed by MatMul node name.
        importance: per-MatMul-input ``[K]`` error weights keyed by the activation
            tensor's name (see :func:`quantize.calibration.activation_importance`).

    Raises:
        QuantizationError: invalid settings.
    """
    settings.check()
    gemms = rewrite_gemms(model)
    folded = fold_weight_transposes(model)
    writer = BlockWriter(model, settings.accuracy_level)
    bits_for = bits_for or {}
    chosen: dict[str, int] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        init = writer.initializers.get(weight)
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        if init is None or len(init.dims) != 2:
            nodes.append(node)
            continue
        if init.dims[0] % settings.block_size:
            ks = sorted({int(t.dims[0]) for t in writer.initializers.values() if len(t.dims) == 2})
            allowed = [b for b in (16, 32, 64, 128, 256) if all(k % b == 0 for k in ks)]
            raise QuantizationError(
                f"{node.name}: K={init.dims[0]} is not a multiple of block_size "
                f"{settings.block_size} (a padded block is not supported by searched "
                f"scales); block sizes that fit every weight here: {allowed}"
            )
        bits = bits_for.get(node.name, settings.bits)
        symmetric = settings.symmetric or bits == 8
        blocks = quantize_blocks(
            numpy_helper.to_array(init),
            bits=bits,
            block_size=settings.block_size,
            symmetric=symmetric,
            importance=None if importance is None else importance.get(node.input[0]),
        )
        nodes.extend(writer.replace(node, weight.removesuffix(".T"), blocks))
        chosen[node.name] = bits
    writer.splice(model, nodes)
    return SearchedResult(
        model=model,
        settings=settings,
        census=census(model),
        lm_head=logits_producer(model, logits),
        bits=chosen,
        weighted=importance is not None,
        gemms_rewritten=gemms.rewritten,
        folded_transposes=folded,
    )


_NORM_SCALE_INPUT = {
    "SimplifiedLayerNormalization": 1,
    "LayerNormalization": 1,
    "SkipSimplifiedLayerNormalization": 2,
    "SkipLayerNormalization": 2,
}
_CHANNEL_PRESERVING = {"Gather", "Identity", "Cast", "Reshape"}


def norm_importance(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Data-free error weights: for an activation that a normalization produced,
    ``scale ** 2`` per channel (after RMSNorm every channel has about unit mean square
    before its learned scale, so the scale squared is the channel's expected x^2).

    Keyed by activation name, following Gather/Reshape/Cast ops that keep channels (the
    fused graph's last-position pick before the lm_head). MatMuls fed by anything else
    (attention output, the MLP's product) get no entry: uniform weights.
    """
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        index = _NORM_SCALE_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in inits:
            scale = numpy_helper.to_array(inits[node.input[index]]).astype(np.float32)
            out[node.output[0]] = np.square(scale).reshape(-1)
        elif node.op_type in _CHANNEL_PRESERVING and node.input and node.input[0] in out:
            source = out[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if node.op_type != "Gather" or axis != -1:
                out[node.output[0]] = source
    return out


def lm_head_importance(model: onnx.ModelProto, logits: str = "logits") -> dict[str, np.ndarray]:
    """:func:`norm_importance` for the lm_head's input only ({} when it has none).

    On SmolLM2-135M it lowered perplexity for the lm_head (gguf-head4 39.30 -> 38.47,
    int4-search 45.67 -> 45.15) but not for the layers (int4-search 46.07 with every
    normalized input weighted), so only the lm_head uses it.
    """
    weights = norm_importance(model)
    head = next((n for n in model.graph.node if logits in n.output and n.op_type == "MatMul"), None)
    if head is None or head.input[0] not in weights:
        return {}
    return {head.input[0]: weights[head.input[0]]}
