"""ggml block layouts -> :class:`Blocks` that MatMulNBits computes with exactly.

Every GGUF type carried here decodes to integer codes, one scale per block along K and,
for the types with a minimum, one float offset per block (``blocksums(x) @ offsets``,
see :mod:`edge_slm_quantize.blocks`). The container is chosen so that onnxruntime's
MatMulNBits kernel, de-quantizing ``(code - zero_point) * scale`` in fp32 (checked on
onnxruntime 1.31 at accuracy levels 0 and 1, bits 4 and 8, blocks 16 and 32), gives
every weight the value ``gguf.quants.dequantize`` gives, bit for bit:

======  ==========================  ===================  ================================
type    GGUF value                  container            scale / zero point / offset
======  ==========================  ===================  ================================
Q4_0    ``d (q - 8)``               4-bit, block 32      ``d`` / 8 / -
Q4_1    ``d q + m``                 4-bit, block 32      ``d`` / 8 or 0 / ``m + z d``
Q5_0    ``d (q - 16)``              8-bit, block 32      ``d`` / 128 (codes ``q + 112``)
Q5_1    ``d q + m``                 8-bit, block 32      ``d`` / 128 or 112 / ``m + ...``
Q8_0    ``d q`` (int8 q)            8-bit, block 32      ``d`` / 128 (codes ``q + 128``)
Q2_K    ``d sc q - dmin m``         4-bit, block 16      ``d sc`` / 2 or 0 / offset
Q3_K    ``d (sc - 32) (q - 4)``     4-bit, block 16      ``d (sc - 32)`` / 4 / -
Q4_K    ``d sc q - dmin m``         4-bit, block 32      ``d sc`` / 8 or 0 / offset
Q5_K    ``d sc q - dmin m``         8-bit, block 32      ``d sc`` / 128 or 112 / offset
Q6_K    ``d sc (q - 32)``           8-bit, block 16      ``d sc`` / 128 (codes ``q + 96``)
======  ==========================  ===================  ================================

Why it is exact: ``d`` is an fp16 value (11 significant bits) and the K-quants'
sub-block scale ``sc`` has at most 8 bits, so ``d * sc`` has at most 19 significant bits
and is an fp32 value (an fp16 scale would round it: the scales stay fp32, stored as
``d`` in fp16 and ``sc`` in int8 and multiplied when the session loads them, see
:attr:`Blocks.scale_factors`). ``(code - zero_point) * scale`` then has at most 24
significant bits (Q6_K: 6 bits of code times 18 of scale): exact in fp32, as GGUF's own
``d * q`` is. The offset types compute ``fl(d*q - min)`` in GGUF; the kernel
computes ``fl((q - z) d + M)`` with ``M = z d - min``: equal when ``M`` is an fp32
value. ``z`` is the middle code where that holds (centred codes keep the int8-activation
kernel accurate) and ``z = 0`` (``M = -min``, always exact) in the blocks where it does
not; :func:`with_offsets` checks every block.

Types not listed (IQ*, TQ*, MXFP4, ...) are refused by :func:`decode_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edge_slm_quantize.blocks import Blocks
from edge_slm_quantize.errors import QuantizationError

QK_K = 256


class GGUFError(QuantizationError):
    """The GGUF source cannot be transcoded (not a GGUF, moved, changed, unsupported)."""


class UnsupportedGGUFTypeError(GGUFError):
    """A weight is stored in a GGUF type this transcoder does not carry over exactly."""


def _fp16(raw: np.ndarray) -> np.ndarray:
    """``[..., 2]`` uint8 little-endian halves -> float32 ``[...]`` (exact)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` ggml nibble bytes -> ``[..., 32]`` codes (low halves, then high halves)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """``[..., 4]`` bytes (a little-endian uint32 mask) -> ``[..., 32]`` bits 0/1."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def with_offsets(
    bits: int,
    codes: np.ndarray,
    scales: np.ndarray,
    minus: np.ndarray,
    low: int,
    types: tuple[str, ...],
    scale_factors: tuple[np.ndarray, np.ndarray] | None = None,
    minus_factors: tuple[np.ndarray, np.ndarray] | None = None,
) -> Blocks:
    """Blocks for GGUF values ``fl(fl(scale * q) - minus)`` with ``q = code - low``.

    Each block gets the container's middle code as zero point and the offset
    ``M = fl(mid_q * scale - minus)`` when the kernel's ``fl(fl((code - mid) * scale) + M)``
    then equals the GGUF value for every weight of the block, else zero point ``low``
    and ``M = -minus`` (exact by construction). With the factors of ``scales`` and
    ``minus`` (K-quants), the offsets are stored as those factors and the per-block
    shift (:attr:`Blocks.min_factors`), computed ``shift * scale - minus`` as here.
    """
    mid = 1 << (bits - 1)
    q = codes.astype(np.float32) - np.float32(low)
    s, m = scales[..., None], minus[..., None]
    reference = s * q - m
    centred = (mid - low) * scales - minus  # fp32, the offset with zero point ``mid``
    kernel = (codes.astype(np.float32) - np.float32(mid)) * s + centred[..., None]
    ok = np.all(kernel == reference, axis=-1)
    zero = np.where(ok, mid, low).astype(np.uint8)
    shift = np.where(ok, np.float32(mid - low), np.float32(0))
    offsets = shift * scales - minus  # = centred where ok, -minus elsewhere
    factors = None if minus_factors is None else (shift, *minus_factors)
    return Blocks(bits, codes, scales, zero, offsets, types, scale_factors, factors)


def _q4_0(b: np.ndarray) -> Blocks:
    b = b.reshape(b.shape[0], -1, 18)
    scales = _fp16(b[..., 0:2])
    zero = np.full(scales.shape, 8, dtype=np.uint8)
    return Blocks(4, _nibbles(b[..., 2:18]), scales, zero, None, ("Q4_0",))


def _fp16_minus(mins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1: ``-m`` as offset factors (fp16 values, inner factor 1)."""
    return -mins, np.ones((*mins.shape, 1), dtype=np.float32)


def _q4_1(b: np.ndarray) -> Blocks:
    b = b.reshape(b.shape[0], -1, 20)
    scales, mins = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    codes = _nibbles(b[..., 4:20])
    return with_offsets(4, codes, scales, -mins, 0, ("Q4_1",), None, _fp16_minus(mins))


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return (_nibbles(qs) | (_fifth_bits(qh) << 4)).astype(np.uint8)


def _q5_0(b: np.ndarray) -> Blocks:
    b = b.reshape(b.shape[0], -1, 22)
    scales = _fp16(b[..., 0:2])
    codes = _q5_codes(b[..., 2:6], b[..., 6:22]) + np.uint8(112)  # q - 16 = code - 128
    zero = np.full(scales.shape, 128, dtype=np.uint8)
    return Blocks(8, codes, scales, zero, None, ("Q5_0",))


def _q5_1(b: np.ndarray) -> Blocks:
    b = b.reshape(b.shape[0], -1, 24)
    scales, mins = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    codes = _q5_codes(b[..., 4:8], b[..., 8:24]) + np.uint8(112)
    return with_offsets(8, codes, scales, -mins, 112, ("Q5_1",), None, _fp16_minus(mins))


def _q8_0(b: np.ndarray) -> Blocks:
    b = b.reshape(b.shape[0], -1, 34)
    scales = _fp16(b[..., 0:2])
    codes = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    zero = np.full(scales.shape, 128, dtype=np.uint8)
    return Blocks(8, codes, scales, zero, None, ("Q8_0",))


def _super_blocks(b: np.ndarray, size: int) -> tuple[int, np.ndarray]:
    """``[rows, bytes]`` -> (rows, ``[rows * super-blocks, size]``)."""
    return b.shape[0], b.reshape(-1, size)


def _factored(
    d: np.ndarray, sub: np.ndarray, rows: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Sub-block scales ``d * sub`` ``[rows, blocks]`` and their factors (fp16 d, int8 sub)."""
    outer = d.reshape(rows, -1)
    inner = sub.astype(np.float32).reshape(rows, outer.shape[1], -1)
    scales = (outer[..., None] * inner).reshape(rows, -1)
    return scales, (outer, inner)


def _q2_k(data: np.ndarray) -> Blocks:
    rows, b = _super_blocks(data, 84)
    sc, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _fp16(b[:, 80:82]), _fp16(b[:, 82:84])
    codes = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    codes = codes.reshape(rows, -1, 16)
    scales, factors = _factored(d, sc & 0x0F, rows)
    minus, minus_factors = _factored(dmin, sc >> 4, rows)
    return with_offsets(4, codes, scales, minus, 0, ("Q2_K",), factors, minus_factors)


def _q3_k(data: np.ndarray) -> Blocks:
    rows, b = _super_blocks(data, 110)
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _fp16(b[:, 108:110])
    low = (packed[:, 0:8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8)[:, None]).reshape(-1, 16)
    high = (packed[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8)[:, None]).reshape(
        -1, 16
    )
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - np.int8(32)
    ql = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    qh = (hmask.reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    # GGUF: q = ql - 4 when the mask bit is clear, so code = q + 4 = ql + 4 * bit
    codes = (ql.reshape(-1, 16, 16) + (qh.reshape(-1, 16, 16) << 2)).reshape(rows, -1, 16)
    scales, factors = _factored(d, sc, rows)
    zero = np.full(scales.shape, 4, dtype=np.uint8)
    return Blocks(4, codes.astype(np.uint8), scales, zero, None, ("Q3_K",), factors)


def _k_scales(b: np.ndarray, rows: int) -> dict[str, Any]:
    """Q4_K / Q5_K: sub-block scales, ``dmin * m`` and their factors (``with_offsets``
    keyword arguments)."""
    from gguf.quants import Q4_K

    d, dmin = _fp16(b[:, 0:2]), _fp16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    scales, factors = _factored(d, sc, rows)
    minus, minus_factors = _factored(dmin, m, rows)
    return {
        "scales": scales,
        "minus": minus,
        "scale_factors": factors,
        "minus_factors": minus_factors,
    }


def _q4_k(data: np.ndarray) -> Blocks:
    rows, b = _super_blocks(data, 144)
    qs = b[:, 16:144].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    codes = (qs & 0x0F).reshape(rows, -1, 32)
    return with_offsets(4, codes, low=0, types=("Q4_K",), **_k_scales(b, rows))


def _q5_k(data: np.ndarray) -> Blocks:
    rows, b = _super_blocks(data, 176)
    ql = (b[:, 48:176].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F
    qh = (b[:, 16:48].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    codes = (ql.reshape(-1, 8, 32) | (qh.reshape(-1, 8, 32) << 4)) + np.uint8(112)
    codes = codes.reshape(rows, -1, 32)
    return with_offsets(8, codes, low=112, types=("Q5_K",), **_k_scales(b, rows))


def _q6_k(data: np.ndarray) -> Blocks:
    rows, b = _super_blocks(data, 210)
    ql = (b[:, 0:128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ql.reshape(-1, 8, 32) | (qh.reshape(-1, 8, 32) << 4)  # 0..63, value q - 32
    codes = (q + np.uint8(96)).reshape(rows, -1, 16)  # q - 32 = code - 128
    scales, factors = _factored(_fp16(b[:, 208:210]), b[:, 192:208].view(np.int8), rows)
    zero = np.full(scales.shape, 128, dtype=np.uint8)
    return Blocks(8, codes, scales, zero, None, ("Q6_K",), factors)


# GGUF type name -> decoder of its raw bytes ``[rows, bytes per row]``.
DECODERS: dict[str, Callable[[np.ndarray], Blocks]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
SUPPORTED_TYPES = tuple(DECODERS)
FLOAT_TYPES = ("F32", "F16", "BF16")


def decode_blocks(data: np.ndarray, type_name: str, tensor: str = "") -> Blocks:
    """Raw GGUF bytes ``[N, bytes per row]`` of one tensor -> :class:`Blocks`.

    Raises:
        UnsupportedGGUFTypeError: ``type_name`` is not one of :data:`SUPPORTED_TYPES`.
    """
    decoder = DECODERS.get(type_name)
    if decoder is None:
        where = f"GGUF tensor {tensor!r} is stored as {type_name}" if tensor else type_name
        raise UnsupportedGGUFTypeError(
            f"{where}, which cannot be carried into MatMulNBits exactly; carried types: "
            f"{list(SUPPORTED_TYPES)} (float tensors {list(FLOAT_TYPES)} stay float). "
            "Re-quantize such tensors from their de-quantized weights with method "
            "'gguf-small' (4-bit searched blocks), or quantize the whole bundle with "
            "'int4-search'"
        )
    return decoder(np.ascontiguousarray(data))
