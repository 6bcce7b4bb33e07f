"""GGUF transcoding: carry a GGUF file's quantized blocks into MatMulNBits exactly.

A model exported from a GGUF file went through transformers, which de-quantized every
block to float32. Quantizing that graph again with other block boundaries or other
scales loses accuracy a second time (SmolLM2-135M's Q4_1 weights: perplexity +28% with
our own int4). This module reads the original blocks with ``gguf.GGUFReader`` and
writes them into ``com.microsoft`` ``MatMulNBits`` nodes, so the bundle computes with
exactly the weights the GGUF file holds: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
Q2_K..Q6_K (the layouts and why each is exact: :mod:`edge_slm_quantize.gguf_types`).
Every carried tensor is checked at transcoding time: the blocks, de-quantized as the
kernel does, equal ``gguf.quants.dequantize`` bit for bit, or :class:`GGUFError`.

A fused projection whose parts need different containers (a Q4_K attn_q next to a Q6_K
attn_v: 4-bit blocks of 32 and 8-bit blocks of 16) becomes one MatMulNBits node per run
of parts sharing a container, joined by a Concat along N.

Types that cannot be carried exactly (IQ*, TQ*, MXFP4, ...) are refused with
:class:`UnsupportedGGUFTypeError` naming the tensor and the type, unless the caller asks
for re-quantization (``requantize``: method ``gguf-small``), which re-quantizes them,
and every type wider than the chosen bits, from the de-quantized weights.

The graph's weights are matched to GGUF tensors by name (the fused graph of
``export/fused.py``: ``layers.{i}.qkv_proj.weight`` = attn_q | attn_k | attn_v along N,
``gate_up_proj`` = ffn_gate | ffn_up, ``o_proj``, ``down_proj``, the tied embedding or
``output.weight``). llama.cpp's converter permutes the rows of attn_q / attn_k for its
rotary layout and transformers un-permutes them when it loads a GGUF: a permutation of
output rows (N) moves whole K-blocks, so the blocks are re-ordered, not re-quantized.
Every transcoded weight is also compared with the float32 graph's weight: a wrong
mapping or permutation raises :class:`GGUFMismatchError`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_slm_quantize.blocks import MIN_TERM_SUFFIX, Blocks, BlockWriter, concat_rows
from edge_slm_quantize.gguf_types import (
    FLOAT_TYPES,
    SUPPORTED_TYPES,
    GGUFError,
    UnsupportedGGUFTypeError,
    decode_blocks,
)
from edge_slm_quantize.weight_only import MatMulCensus, WeightOnlySettings, census, logits_producer

__all__ = [
    "FLOAT_TYPES",
    "SUPPORTED_TYPES",
    "GGUFError",
    "GGUFMismatchError",
    "GGUFResult",
    "GGUFSource",
    "UnsupportedGGUFTypeError",
    "decode_blocks",
    "read_gguf",
    "transcode_gguf",
]

# Largest |GGUF de-quantized - graph weight| accepted, relative to the weight's max |w|.
MATCH_TOLERANCE = 1e-5
_PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp permutes Q/K rows for these
_CHECK_ROWS = 8192  # rows de-quantized at a time when checking a tensor (bounded memory)


class GGUFMismatchError(GGUFError):
    """A GGUF tensor does not de-quantize to the graph's weight (wrong mapping)."""


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
    requantized: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> "Q6_K -> ..."
    split_projections: int = 0  # fused weights carried as several nodes + Concat

    def _float_weight_nodes(self) -> list[str]:
        return [n for n in self.census.float_weight_nodes if not n.endswith(MIN_TERM_SUFFIX)]

    def details(self) -> dict[str, Any]:
        """JSON-ready facts for ``Quantization.details``."""
        requantized = Counter(v for v in self.requantized.values())
        return {
            "quantized_matmuls": self.census.quantized,
            # the offset terms (blocksums(x) @ offsets) are float MatMuls by design
            "remaining_float_matmuls": len(self._float_weight_nodes()),
            "remaining_float_matmul_nodes": self._float_weight_nodes(),
            "activation_matmuls": self.census.activation,
            "gemms_rewritten": 0,
            "lm_head": "quantized" if self.lm_head == "MatMulNBits" else f"float ({self.lm_head})",
            "gguf_source": self.source,
            "gguf_tensor_types": dict(sorted(self.gguf_types.items())),
            "gguf_float_weights": self.float_weights,
            # MatMulNBits nodes with an offset term (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K minimums)
            "q4_1_min_terms": self.min_terms,
            "gguf_split_projections": self.split_projections,
            "gguf_requantized": dict(sorted(requantized.items())),
            "max_abs_weight_diff_vs_fp32_graph": self.max_abs_weight_diff,
            "blocks": "carried from the GGUF exactly (every carried weight equal to "
            "gguf.quants.dequantize, checked)"
            + (
                f"; the lm_head was re-quantized ({self.lm_head_requantized}, searched scales)"
                if self.lm_head_requantized
                else ""
            )
            + (
                f"; {len(self.requantized)} tensors re-quantized from their de-quantized "
                "weights (gguf_requantized)"
                if self.requantized
                else ""
            ),
        }


def _reference(data: np.ndarray, kind: str) -> np.ndarray:
    """``gguf.quants.dequantize`` of raw rows: the values the GGUF file stands for."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(data, GGMLQuantizationType[kind]), dtype=np.float32)


def _check_part(
    name: str,
    kind: str,
    data: np.ndarray,
    perm: np.ndarray | None,
    blocks: Blocks,
    columns: np.ndarray,
) -> float:
    """Check ``blocks`` (one GGUF tensor, rows in graph order) against the GGUF and the graph.

    Returns the largest |difference| from the graph's weight ``columns [K, rows]``.

    Raises:
        GGUFError: a weight differs from ``gguf.quants.dequantize`` (a transcoder bug).
        GGUFMismatchError: the graph's weight is not this tensor (wrong mapping).
    """
    rows = blocks.shape[0]
    order = np.arange(rows) if perm is None else perm
    worst = 0.0
    scale = float(np.abs(columns).max()) or 1.0
    for start in range(0, rows, _CHECK_ROWS):
        index = np.arange(start, min(rows, start + _CHECK_ROWS))
        ours = blocks.rows(index).dequantize()
        if not np.array_equal(ours, _reference(data[order[index]], kind)):
            raise GGUFError(
                f"GGUF tensor {name!r} ({kind}): the MatMulNBits blocks do not reproduce "
                "gguf.quants.dequantize exactly (a transcoder bug; please report it)"
            )
        diff = float(np.abs(ours - columns[:, index].T).max())
        if diff > MATCH_TOLERANCE * scale:
            raise GGUFMismatchError(
                f"graph weight columns of GGUF tensor {name!r} differ from its de-quantized "
                f"values by {diff:.3g} (tolerance {MATCH_TOLERANCE * scale:.3g}): was the "
                "bundle exported from this GGUF?"
            )
        worst = max(worst, diff)
    return worst


def _containers(pieces: list[Blocks]) -> list[list[Blocks]]:
    """Consecutive pieces grouped by container (bits, block size): one node per group."""
    groups: list[list[Blocks]] = []
    for piece in pieces:
        key = (piece.bits, piece.block_size)
        if groups and (groups[-1][0].bits, groups[-1][0].block_size) == key:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    return groups


def _split_nodes(
    rewriter: BlockWriter, node: onnx.NodeProto, weight: str, groups: list[list[Blocks]]
) -> list[onnx.NodeProto]:
    """One MatMulNBits per container group, their outputs joined along N."""
    nodes: list[onnx.NodeProto] = []
    outputs = []
    for i, group in enumerate(groups):
        part = helper.make_node(
            "MatMul",
            [node.input[0], f"{weight}/part{i}"],
            [f"{node.output[0]}/part{i}"],
            name=f"{node.name}/part{i}",
        )
        nodes.extend(rewriter.replace(part, f"{weight}/part{i}", concat_rows(group)))
        outputs.append(part.output[0])
    nodes.append(
        helper.make_node("Concat", outputs, [node.output[0]], name=f"{node.name}/concat", axis=-1)
    )
    return nodes


def transcode_gguf(
    model: onnx.ModelProto,
    source: GGUFSource,
    settings: WeightOnlySettings,
    *,
    logits: str = "logits",
    lm_head: WeightOnlySettings | None = None,
    importance: dict[str, np.ndarray] | None = None,
    requantize: WeightOnlySettings | None = None,
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
        importance: per-input importance of the squared error (the lm_head's), by input.
        requantize: re-quantize, from their de-quantized weights with searched scales at
            these settings, the tensors whose carried container is wider than
            ``requantize.bits`` and those in types that cannot be carried (the smaller
            variant); None carries every tensor exactly and refuses the others.

    Raises:
        UnsupportedGGUFTypeError: a weight in a type that is not carried (and no
            ``requantize``): the message names the tensor, the type and the options.
        GGUFMismatchError: a GGUF tensor does not de-quantize to the graph's weight, or a
            graph weight has no GGUF tensor.
    """
    from edge_slm_quantize.search import quantize_blocks

    rewriter = BlockWriter(model, settings.accuracy_level)
    graph = model.graph
    types: Counter[str] = Counter()
    floats: list[str] = []
    requantized: dict[str, str] = {}
    worst = 0.0
    split = 0
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
        expected = numpy_helper.to_array(rewriter.initializers[weight])  # [K, N]
        if lm_head is not None and logits in node.output:
            requant = quantize_blocks(
                expected,
                bits=lm_head.bits,
                block_size=lm_head.block_size,
                symmetric=lm_head.symmetric or lm_head.bits == 8,
                importance=importance.get(node.input[0]) if importance else None,
            )
            nodes.extend(rewriter.replace(node, weight, requant))
            requantized_from = f"{'+'.join(kinds)} -> {requant.types[0]} {lm_head.bits}-bit"
            continue
        rows = sum(source.tensors[name][1].shape[0] for name, _ in parts)
        if expected.shape[1] != rows:
            raise GGUFMismatchError(
                f"graph weight {weight!r} is {list(expected.shape)}, the GGUF tensors "
                f"{[name for name, _ in parts]} have {rows} rows together"
            )
        pieces: list[Blocks] = []
        start = 0
        for (name, perm), kind in zip(parts, kinds, strict=True):
            data = source.tensors[name][1]
            columns = expected[:, start : start + data.shape[0]]
            start += data.shape[0]
            blocks: Blocks | None = None
            try:
                blocks = decode_blocks(data, kind, name)
            except UnsupportedGGUFTypeError:
                if requantize is None:
                    raise
            if blocks is not None and perm is not None:
                blocks = blocks.rows(perm)
            if requantize is not None and (blocks is None or blocks.bits > requantize.bits):
                # the smaller variant: searched blocks from the de-quantized weights
                piece = quantize_blocks(
                    columns,
                    bits=requantize.bits,
                    block_size=requantize.block_size,
                    symmetric=requantize.symmetric or requantize.bits == 8,
                    importance=importance.get(node.input[0])
                    if importance and logits in node.output
                    else None,
                )
                requantized[name] = f"{kind} -> {piece.types[0]} {requantize.bits}-bit"
                pieces.append(piece)
                continue
            assert blocks is not None
            if blocks.shape[1] != expected.shape[0]:
                raise GGUFMismatchError(
                    f"GGUF tensor {name!r} has {blocks.shape[1]} inputs, graph weight "
                    f"{weight!r} has {expected.shape[0]}"
                )
            worst = max(worst, _check_part(name, kind, data, perm, blocks, columns))
            types[kind] += 1
            pieces.append(blocks)
        groups = _containers(pieces)
        if len(groups) == 1:
            nodes.extend(rewriter.replace(node, weight, concat_rows(groups[0])))
        else:
            nodes.extend(_split_nodes(rewriter, node, weight, groups))
            split += 1
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
        requantized=requantized,
        split_projections=split,
    )
