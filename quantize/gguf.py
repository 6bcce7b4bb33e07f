"""GGUF transcoding: carry a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks into MatMulNBits unchanged.

A model exported from a GGUF file went through transformers, which de-quantized every
block to float32. Quantizing that graph again with other block boundaries or other
scales loses accuracy a second time (SmolLM2-135M's Q4_1 weights: perplexity +28% with
our own int4). This module reads the original blocks with ``gguf.GGUFReader`` and
writes them into ``com.microsoft`` ``MatMulNBits`` nodes as they are, so the bundle
computes with exactly the weights the GGUF file holds.

The formats, per block of 32 weights along the input dimension K (ggml-common.h):

* ``Q4_0``: fp16 ``d``, 16 bytes of nibbles; ``w = (q - 8) * d``.
* ``Q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = q * d + m``.
* ``Q8_0``: fp16 ``d``, 32 int8 ``q``; ``w = q * d``.

Nibble ``j`` of a 4-bit block is the low half of byte ``j`` (j < 16) or the high half of
byte ``j - 16``; MatMulNBits packs elements ``2i`` and ``2i + 1`` in byte ``i``: the
codes are re-packed, never changed. MatMulNBits computes ``(q - zero_point) * scale``:

* Q4_0 -> uint8 zero point 8 (the op's default), scale ``d`` (fp16 -> fp32 is exact);
* Q8_0 -> codes ``q + 128`` as uint8 with the default zero point 128, scale ``d``;
* Q4_1 -> zero point 8, scale ``d``, and the block offset as a separate term:
  ``w = (q - 8) d + (m + 8d)``, so ``sum_k x_k w_kn`` is the MatMulNBits product plus
  ``blocksums(x) @ M`` with ``M [K/32, N] = m + 8d`` (one float per block, as in the
  GGUF; ``m = M - 8d`` exactly). Zero point 0 (``w = q d + m``) is exact too, but with
  int8 activations (accuracy_level 4) the kernel's error grows with the uncentred
  codes: SmolLM2's greedy answers drifted while perplexity moved only 1%. onnxruntime's MatMulNBits also takes float zero points
  (``zp = -m / d``), but its CPU kernel then de-quantizes the whole matrix on every
  call: about 60x slower than the uint8 path on a 576x1536 weight (measured, ort 1.31).

The graph's weights are matched to GGUF tensors by name (the fused graph of
``export/fused.py``: ``layers.{i}.qkv_proj.weight`` = attn_q | attn_k | attn_v along N,
``gate_up_proj`` = ffn_gate | ffn_up, ``o_proj``, ``down_proj``, the tied embedding or
``output.weight``). llama.cpp's converter permutes the rows of attn_q / attn_k for its
rotary layout and transformers un-permutes them when it loads a GGUF: a permutation of
output rows (N) moves whole K-blocks, so the blocks are re-ordered, not re-quantized.
Every transcoded weight is de-quantized once and compared with the float32 graph's
weight: a wrong mapping or permutation raises :class:`GGUFMismatchError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_slm_quantize.blocks import MIN_TERM_SUFFIX, Blocks, BlockWriter
from edge_slm_quantize.errors import QuantizationError
from edge_slm_quantize.weight_only import MatMulCensus, WeightOnlySettings, census, logits_producer

BLOCK = 32
SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")
# Largest |GGUF de-quantized - graph weight| accepted, relative to the weight's max |w|.
MATCH_TOLERANCE = 1e-5
_MS = "com.microsoft"
_PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp permutes Q/K rows for these


class GGUFError(QuantizationError):
    """The GGUF source cannot be transcoded (not a GGUF, moved, changed, unsupported)."""


class UnsupportedGGUFTypeError(GGUFError):
    """A weight is stored in a GGUF type this transcoder does not carry over."""


class GGUFMismatchError(GGUFError):
    """A GGUF tensor does not de-quantize to the graph's weight (wrong mapping)."""


def _fp16(raw: np.ndarray) -> np.ndarray:
    """``[..., 2]`` uint8 little-endian halves -> float32 (exact)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` ggml nibble bytes -> ``[..., 32]`` codes (low halves, then high halves)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)


def decode_blocks(data: np.ndarray, type_name: str) -> Blocks:
    """Raw GGUF bytes ``[N, bytes per row]`` of one tensor -> :class:`Blocks`.

    Raises:
        UnsupportedGGUFTypeError: ``type_name`` is not one of :data:`SUPPORTED_TYPES`.
    """
    rows = data.shape[0]
    if type_name == "Q4_0":
        b = data.reshape(rows, -1, 18)
        scales, codes = _fp16(b[..., 0:2]), _nibbles(b[..., 2:18])
        zero = np.full(scales.shape, 8, dtype=np.uint8)
        return Blocks(4, codes, scales, zero, None, (type_name,))
    if type_name == "Q4_1":
        b = data.reshape(rows, -1, 20)
        scales, mins, codes = _fp16(b[..., 0:2]), _fp16(b[..., 2:4]), _nibbles(b[..., 4:20])
        # Centred codes: q*d + m = (q - 8)*d + (m + 8d). With int8 activations
        # (accuracy_level 4) the kernel's error grows with |q - zp|; zero point 0 made
        # greedy chat drift (SmolLM2 answered in French), zero point 8 keeps it on track.
        zero = np.full(scales.shape, 8, dtype=np.uint8)
        return Blocks(4, codes, scales, zero, mins + np.float32(8) * scales, (type_name,))
    if type_name == "Q8_0":
        b = data.reshape(rows, -1, 34)
        scales = _fp16(b[..., 0:2])
        codes = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zero = np.full(scales.shape, 128, dtype=np.uint8)
        return Blocks(8, codes, scales, zero, None, (type_name,))
    raise UnsupportedGGUFTypeError(
        f"GGUF tensor type {type_name} is not supported for transcoding; supported: "
        f"{list(SUPPORTED_TYPES)} (float tensors {list(FLOAT_TYPES)} stay float)"
    )


def concat_rows(parts: list[Blocks], where: str) -> Blocks:
    """Blocks of several tensors stacked along N (a fused projection)."""
    bits = {p.bits for p in parts}
    if len(bits) > 1:
        types = [t for p in parts for t in p.types]
        raise UnsupportedGGUFTypeError(
            f"{where}: the fused projection mixes 4- and 8-bit GGUF types {types}; one "
            "MatMulNBits node has one bit width (supported within a projection: Q4_0 with "
            "Q4_1, or Q8_0 alone)"
        )
    mins = None
    if any(p.mins is not None for p in parts):
        mins = np.concatenate(
            [p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts]
        )
    return Blocks(
        bits.pop(),
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]),
        mins,
        tuple(t for p in parts for t in p.types),
    )


@dataclass(frozen=True)
class GGUFSource:
    """The quantized tensors of a GGUF file and what the mapping needs from its header."""

    path: Path
    architecture: str
    num_heads: int
    num_kv_heads: int
    tensors: dict[str, tuple[str, np.ndarray]]  # name -> (type name, raw bytes [rows, bytes])


def _field(reader: Any, key: str) -> Any:
    entry = reader.fields.get(key)
    return None if entry is None else entry.contents()


def read_gguf(path: Path) -> GGUFSource:
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped) and index its 2-D tensors."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # the build extra installs it
        raise GGUFError("GGUF transcoding needs the 'gguf' package (build extra)") from exc
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise GGUFError(f"cannot read {str(path)!r} as a GGUF file: {exc}") from exc
    arch = str(_field(reader, "general.architecture") or "")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    if heads is None:
        raise GGUFError(f"{str(path)!r} has no {arch}.attention.head_count")
    tensors = {
        t.name: (t.tensor_type.name, np.asarray(t.data))
        for t in reader.tensors
        if len(t.shape) == 2
    }
    return GGUFSource(path, arch, int(heads), int(kv_heads), tensors)


def _unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Row index ``P`` with ``W_hf[i] = W_gguf[P[i]]`` (transformers' reverse permutation)."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(2, 1).reshape(rows)


def _gguf_parts(weight: str, source: GGUFSource) -> list[tuple[str, np.ndarray | None]] | None:
    """GGUF tensor names (and row permutations) behind a fused-graph weight, or None."""
    permute = source.architecture in _PERMUTED_ARCHITECTURES
    if weight in ("embed_tokens.weight.T", "embed_tokens.weight"):
        return [("token_embd.weight", None)]
    if weight == "lm_head.weight.T":
        return [("output.weight", None)]
    parts = weight.split(".")
    if len(parts) != 4 or parts[0] != "layers" or parts[3] != "weight":
        return None
    i, proj = parts[1], parts[2]
    q_rows = source.tensors.get(f"blk.{i}.attn_q.weight", ("", np.empty((0, 0))))[1].shape[0]
    k_rows = source.tensors.get(f"blk.{i}.attn_k.weight", ("", np.empty((0, 0))))[1].shape[0]
    if proj == "qkv_proj":
        q_perm = _unpermute_index(q_rows, source.num_heads) if permute else None
        k_perm = _unpermute_index(k_rows, source.num_kv_heads) if permute else None
        return [
            (f"blk.{i}.attn_q.weight", q_perm),
            (f"blk.{i}.attn_k.weight", k_perm),
            (f"blk.{i}.attn_v.weight", None),
        ]
    names = {
        "o_proj": ["attn_output"],
        "gate_up_proj": ["ffn_gate", "ffn_up"],
        "down_proj": ["ffn_down"],
    }.get(proj)
    return None if names is None else [(f"blk.{i}.{n}.weight", None) for n in names]


@dataclass
class GGUFResult:
    """The transcoded graph and the facts the manifest records about it."""

    model: onnx.ModelProto
    settings: WeightOnlySettings
    census: MatMulCensus
    lm_head: str
    gguf_types: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors carried
    float_weights: list[str] = field(default_factory=list)  # left float (F32/F16 in the GGUF)
    min_terms: int = 0
    max_abs_weight_diff: float = 0.0
    source: str = ""
    lm_head_requantized: str = ""  # e.g. "Q8_0 -> searched-sym 4-bit"; "" = carried

    def _float_weight_nodes(self) -> list[str]:
        return [n for n in self.census.float_weight_nodes if not n.endswith(MIN_TERM_SUFFIX)]

    def details(self) -> dict[str, Any]:
        """JSON-ready facts for ``Quantization.details``."""
        return {
            "quantized_matmuls": self.census.quantized,
            # the Q4_1 offset terms (blocksums(x) @ offsets) are float MatMuls by design
            "remaining_float_matmuls": len(self._float_weight_nodes()),
            "remaining_float_matmul_nodes": self._float_weight_nodes(),
            "activation_matmuls": self.census.activation,
            "gemms_rewritten": 0,
            "lm_head": "quantized" if self.lm_head == "MatMulNBits" else f"float ({self.lm_head})",
            "gguf_source": self.source,
            "gguf_tensor_types": dict(sorted(self.gguf_types.items())),
            "gguf_float_weights": self.float_weights,
            "q4_1_min_terms": self.min_terms,
            "max_abs_weight_diff_vs_fp32_graph": self.max_abs_weight_diff,
            "blocks": "carried from the GGUF unchanged (codes re-packed, fp16 scales widened)"
            + (
                f"; the lm_head was re-quantized ({self.lm_head_requantized}, searched scales)"
                if self.lm_head_requantized
                else ""
            ),
        }


def transcode_gguf(
    model: onnx.ModelProto,
    source: GGUFSource,
    settings: WeightOnlySettings,
    *,
    logits: str = "logits",
    lm_head: WeightOnlySettings | None = None,
    importance: dict[str, np.ndarray] | None = None,
) -> GGUFResult:
    """Replace the fused graph's MatMul weights by the GGUF's own quantized blocks.

    Args:
        model: an fp32 fused decoder graph (``export/fused.py``) with its weights loaded,
            exported from the GGUF file ``source`` was read from.
        source: the GGUF file's tensors (:func:`read_gguf`).
        settings: only ``accuracy_level`` is used (the blocks fix bits and block size).
        logits: name of the logits output, to report whether the lm_head got quantized.
        lm_head: re-quantize the lm_head (and with it a tied embedding) from its float
            weights with searched scales at these settings instead of carrying its GGUF
            blocks (SmolLM2's is Q8_0: 4 bits saves 13.5 MB); None carries it unchanged.

    Raises:
        UnsupportedGGUFTypeError: a weight in a type other than Q4_0 / Q4_1 / Q8_0 (or float).
        GGUFMismatchError: a GGUF tensor does not de-quantize to the graph's weight, or a
            graph weight has no GGUF tensor.
    """
    from collections import Counter

    rewriter = BlockWriter(model, settings.accuracy_level)
    graph = model.graph
    types: Counter[str] = Counter()
    floats: list[str] = []
    worst = 0.0
    requantized_from = ""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.op_type != "MatMul" or weight not in rewriter.initializers:
            nodes.append(node)
            continue
        parts = _gguf_parts(weight, source)
        if parts is None:
            raise GGUFMismatchError(f"graph weight {weight!r} has no GGUF counterpart")
        missing = [name for name, _ in parts if name not in source.tensors]
        if missing:
            raise GGUFMismatchError(f"graph weight {weight!r}: the GGUF lacks {missing}")
        kinds = [source.tensors[name][0] for name, _ in parts]
        if all(kind in FLOAT_TYPES for kind in kinds):
            floats.append(weight)
            nodes.append(node)
            continue
        decoded = []
        for name, perm in parts:
            kind, data = source.tensors[name]
            blocks = decode_blocks(data, kind)
            decoded.append(blocks if perm is None else blocks.rows(perm))
        blocks = concat_rows(decoded, weight)
        expected = numpy_helper.to_array(rewriter.initializers[weight])  # [K, N]
        if lm_head is not None and logits in node.output:
            from edge_slm_quantize.search import quantize_blocks

            requantized = quantize_blocks(
                expected,
                bits=lm_head.bits,
                block_size=lm_head.block_size,
                symmetric=lm_head.symmetric or lm_head.bits == 8,
                importance=importance.get(node.input[0]) if importance else None,
            )
            nodes.extend(rewriter.replace(node, weight, requantized))
            requantized_from = f"{'+'.join(kinds)} -> {requantized.types[0]} {lm_head.bits}-bit"
            continue
        if expected.shape != blocks.shape[::-1]:
            raise GGUFMismatchError(
                f"graph weight {weight!r} is {list(expected.shape)}, the GGUF blocks give "
                f"{list(blocks.shape[::-1])}"
            )
        diff = float(np.abs(blocks.dequantize() - expected.T).max())
        scale = float(np.abs(expected).max()) or 1.0
        if diff > MATCH_TOLERANCE * scale:
            raise GGUFMismatchError(
                f"graph weight {weight!r} differs from the de-quantized GGUF tensors "
                f"{[name for name, _ in parts]} by {diff:.3g} (tolerance "
                f"{MATCH_TOLERANCE * scale:.3g}): was the bundle exported from this GGUF?"
            )
        worst = max(worst, diff)
        types.update(kinds)
        nodes.extend(rewriter.replace(node, weight, blocks))
    rewriter.splice(model, nodes)
    return GGUFResult(
        model=model,
        settings=settings,
        census=census(model),
        lm_head=logits_producer(model, logits),
        gguf_types=dict(types),
        float_weights=floats,
        min_terms=rewriter.min_terms,
        max_abs_weight_diff=worst,
        source=str(source.path),
        lm_head_requantized=requantized_from,
    )
