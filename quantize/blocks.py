"""Quantized weight blocks and their MatMulNBits form (shared by GGUF transcoding and
searched-scale quantization).

:class:`Blocks` holds a weight ``[N, K]`` as integer codes in blocks along K with one
scale, one integer zero point and optionally one float offset per block;
:class:`BlockWriter` turns a ``MatMul(x, W)`` node into ``com.microsoft`` ``MatMulNBits``
over such blocks (plus ``blocksums(x) @ offsets`` when the blocks have offsets, as Q4_1's
do), storing scales as float16 when that is exact, or as the product of an fp16 and an
int8 factor (the K-quants' ``d * sc``) when that is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

_MS = "com.microsoft"
# Name suffix of the float MatMul that adds the block offsets (Q4_1's minimums).
MIN_TERM_SUFFIX = "_mins"


@dataclass
class Blocks:
    """Quantized weights ``[N, K]`` as blocks along K (32 weights for GGUF types).

    Attributes:
        bits: 4 or 8.
        codes: ``[N, K/block, block]`` uint8 codes, element order (not packed).
        scales: ``[N, K/block]`` float32.
        zero_points: ``[N, K/block]`` uint8.
        mins: ``[N, K/block]`` float32 added to each block (Q4_1: ``m + 8d``), or None.
        types: the GGUF types the rows came from (for the report).
        scale_factors: ``(outer [N, G], inner [N, G, K/block/G])`` with ``scales`` equal
            to ``outer[..., None] * inner`` in fp32, ``outer`` fp16 values and ``inner``
            int8 values (a K-quant's super-block ``d`` and sub-block ``sc``): the file
            stores 2 bytes per super-block and 1 per block instead of 4 per block.
        min_factors: ``(shift [N, K/block], outer [N, G], inner [N, G, K/block/G])`` with
            ``mins`` equal to ``shift * scales - outer[..., None] * inner`` in fp32 (a
            K-quant's offset ``z d sc - dmin m``; Q4_1's ``8 d + m`` with ``outer = -m``
            and ``inner`` ones), ``outer`` fp16 and ``inner`` int8 values, ``shift``
            small integers: 2 bytes per super-block and 1 per block in the file.
    """

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    mins: np.ndarray | None
    types: tuple[str, ...]
    scale_factors: tuple[np.ndarray, np.ndarray] | None = None
    min_factors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def block_size(self) -> int:
        """Weights per block along K."""
        return int(self.codes.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)``."""
        n, blocks, size = self.codes.shape
        return n, blocks * size

    def dequantize(self) -> np.ndarray:
        """The float32 weights ``[N, K]`` the blocks stand for."""
        values = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[
            ..., None
        ]
        if self.mins is not None:
            values = values + self.mins[..., None]
        return values.reshape(self.shape)

    def rows(self, index: np.ndarray) -> Blocks:
        """The blocks of rows ``index`` (a permutation of output rows moves whole blocks)."""
        mins = None if self.mins is None else self.mins[index]
        factors, offsets = self.scale_factors, self.min_factors
        return Blocks(
            self.bits,
            self.codes[index],
            self.scales[index],
            self.zero_points[index],
            mins,
            self.types,
            None if factors is None else (factors[0][index], factors[1][index]),
            None if offsets is None else tuple(f[index] for f in offsets),  # type: ignore[arg-type]
        )


def concat_rows(parts: list[Blocks]) -> Blocks:
    """Blocks of several tensors stacked along N (a fused projection); one container
    (bits and block size) for all of them."""
    assert len({(p.bits, p.block_size) for p in parts}) == 1, "one container per node"
    mins = None
    if any(p.mins is not None for p in parts):
        mins = np.concatenate(
            [p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts]
        )
    factors = offsets = None
    inner = {None if p.scale_factors is None else p.scale_factors[1].shape[2] for p in parts}
    if None not in inner and len(inner) == 1:  # the same factoring for every part
        factors = (
            np.concatenate([p.scale_factors[0] for p in parts if p.scale_factors]),
            np.concatenate([p.scale_factors[1] for p in parts if p.scale_factors]),
        )
    shapes = {None if p.min_factors is None else p.min_factors[2].shape[2] for p in parts}
    if None not in shapes and len(shapes) == 1:
        offsets = tuple(
            np.concatenate([p.min_factors[i] for p in parts if p.min_factors]) for i in range(3)
        )
    return Blocks(
        parts[0].bits,
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]),
        mins,
        tuple(t for p in parts for t in p.types),
        factors,
        offsets,  # type: ignore[arg-type]
    )


def pack_codes(blocks: Blocks) -> np.ndarray:
    """MatMulNBits ``B``: ``[N, K/block, block * bits / 8]`` uint8 (4-bit: element 2i low, 2i+1 high)."""
    if blocks.bits == 8:
        return np.ascontiguousarray(blocks.codes)
    codes = blocks.codes
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(blocks: Blocks) -> np.ndarray:
    """MatMulNBits ``zero_points``: uint8 ``[N * ceil(K/block * bits / 8)]``, rows padded."""
    zp = blocks.zero_points
    if blocks.bits == 8:
        return np.ascontiguousarray(zp.reshape(-1))
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray((zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``[N, K/block, bytes]`` -> ``[N, K/block, block]`` codes."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


class BlockWriter:
    """Replaces ``MatMul(x, W)`` nodes by MatMulNBits over :class:`Blocks`, collecting the
    new nodes and initializers; :meth:`splice` puts them into the graph."""

    def splice(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
        """Make ``nodes`` the graph's nodes, add the new initializers, drop unused ones
        and declare the com.microsoft opset."""
        from edge_slm_quantize.graph_passes import remove_unused_initializers

        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(self.new_inits)
        remove_unused_initializers(model.graph)
        if not any(op.domain == _MS for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(_MS, 1))

    def __init__(
        self, model: onnx.ModelProto, accuracy_level: int | None, half_storage: bool = True
    ) -> None:
        self.graph = model.graph
        self.accuracy_level = accuracy_level
        self.half_storage = half_storage
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.block_sums: dict[tuple[str, int], str] = {}
        self.min_terms = 0

    def _float(self, name: str, values: np.ndarray, nodes: list[onnx.NodeProto]) -> None:
        """A float32 tensor ``name``: stored as fp16 + Cast when every value is an fp16
        value (GGUF scales and minimums are, searched scales too), so the file holds 2 bytes per block like
        the GGUF; onnxruntime folds the Cast into an fp32 initializer at load."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        half = values.astype(np.float16)
        if not self.half_storage or not np.array_equal(half.astype(np.float32), values):
            self.new_inits.append(numpy_helper.from_array(values, name))
            return
        self.new_inits.append(numpy_helper.from_array(half, f"{name}_fp16"))
        nodes.append(
            helper.make_node(
                "Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=onnx.TensorProto.FLOAT
            )
        )

    def _sums(self, x: str, k: int, block: int, out: list[onnx.NodeProto]) -> str:
        """``[..., K/block]`` block sums of activation ``x`` (computed once per tensor)."""
        if (x, block) in self.block_sums:
            return self.block_sums[(x, block)]
        tag = f"{x}/b{block}"
        shape = f"{tag}/blocks_shape"
        self.new_inits.append(
            numpy_helper.from_array(np.asarray([0, 0, k // block, block], np.int64), shape)
        )
        axes = f"{tag}/blocks_axes"
        self.new_inits.append(numpy_helper.from_array(np.asarray([-1], np.int64), axes))
        out.append(helper.make_node("Reshape", [x, shape], [f"{tag}/blocks"], name=f"{tag}/blocks"))
        out.append(
            helper.make_node(
                "ReduceSum",
                [f"{tag}/blocks", axes],
                [f"{tag}/block_sums"],
                name=f"{tag}/block_sums",
                keepdims=0,
            )
        )
        self.block_sums[(x, block)] = f"{tag}/block_sums"
        return self.block_sums[(x, block)]

    def _scales(self, name: str, blocks: Blocks, nodes: list[onnx.NodeProto]) -> None:
        """The fp32 ``[N * K/block]`` scales ``name``: fp16 + Cast when exact, else the
        product of their fp16 and int8 factors when the blocks have them, else fp32."""
        scales = np.ascontiguousarray(blocks.scales.reshape(-1), dtype=np.float32)
        factors = blocks.scale_factors
        if (
            factors is None
            or not self.half_storage
            or np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
        ):
            self._float(name, scales, nodes)
            return
        outer, inner = factors
        half, small = outer.astype(np.float16), inner.astype(np.int8)
        product = (half.astype(np.float32)[..., None] * small.astype(np.float32)).reshape(-1)
        assert np.array_equal(product, scales), "scale factors do not multiply to the scales"
        shape = f"{name}_shape"
        self.new_inits.extend(
            [
                numpy_helper.from_array(half[..., None], f"{name}_outer_fp16"),
                numpy_helper.from_array(small, f"{name}_inner_int8"),
                numpy_helper.from_array(np.asarray([-1], np.int64), shape),
            ]
        )
        nodes.extend(
            [
                helper.make_node(
                    "Cast",
                    [f"{name}_outer_fp16"],
                    [f"{name}_outer"],
                    name=f"{name}_outer_cast",
                    to=onnx.TensorProto.FLOAT,
                ),
                helper.make_node(
                    "Cast",
                    [f"{name}_inner_int8"],
                    [f"{name}_inner"],
                    name=f"{name}_inner_cast",
                    to=onnx.TensorProto.FLOAT,
                ),
                helper.make_node(
                    "Mul", [f"{name}_outer", f"{name}_inner"], [f"{name}_3d"], name=f"{name}_mul"
                ),
                helper.make_node("Reshape", [f"{name}_3d", shape], [name], name=f"{name}_flat"),
            ]
        )

    def _mins(self, name: str, blocks: Blocks, scales: str, nodes: list[onnx.NodeProto]) -> None:
        """The fp32 ``[K/block, N]`` block offsets ``name``: computed from their factors
        (``shift * scales - outer * inner``, the ops in the order :class:`Blocks` states;
        ``scales`` names the flat fp32 scales) when the blocks have them, else stored."""
        assert blocks.mins is not None
        mins = blocks.mins
        half_exact = np.array_equal(mins.astype(np.float16).astype(np.float32), mins)
        if blocks.min_factors is None or not self.half_storage or half_exact:
            self._float(name, mins.T, nodes)
            return
        shift, outer, inner = blocks.min_factors
        n = outer.shape[0]
        half, small = outer.astype(np.float16), inner.astype(np.int8)
        minus = half.astype(np.float32)[..., None] * small.astype(np.float32)
        shift3 = shift.astype(np.float32).reshape(minus.shape)
        scales3 = blocks.scales.reshape(minus.shape)
        assert np.array_equal((shift3 * scales3 - minus).reshape(mins.shape), mins), (
            "offset factors do not give the offsets"
        )
        constant = bool(np.all(shift3 == shift3.flat[0]))
        cast = onnx.TensorProto.FLOAT
        self.new_inits.extend(
            [
                numpy_helper.from_array(half[..., None], f"{name}_outer_fp16"),
                numpy_helper.from_array(np.asarray(minus.shape, np.int64), f"{name}_shape3"),
                numpy_helper.from_array(np.asarray([n, -1], np.int64), f"{name}_shape"),
            ]
        )
        nodes.extend(
            [
                helper.make_node(
                    "Cast", [f"{name}_outer_fp16"], [f"{name}_outer"], name=f"{name}_oc", to=cast
                ),
                helper.make_node(
                    "Reshape", [scales, f"{name}_shape3"], [f"{name}_s3"], name=f"{name}_s3"
                ),
            ]
        )
        if np.all(small == 1):  # the minimums are fp16 values themselves (Q4_1, Q5_1)
            nodes.append(
                helper.make_node(
                    "Identity", [f"{name}_outer"], [f"{name}_minus"], name=f"{name}_m1"
                )
            )
        else:
            self.new_inits.append(numpy_helper.from_array(small, f"{name}_inner_int8"))
            nodes.extend(
                [
                    helper.make_node(
                        "Cast",
                        [f"{name}_inner_int8"],
                        [f"{name}_inner"],
                        name=f"{name}_ic",
                        to=cast,
                    ),
                    helper.make_node(
                        "Mul",
                        [f"{name}_outer", f"{name}_inner"],
                        [f"{name}_minus"],
                        name=f"{name}_m1",
                    ),
                ]
            )
        if constant:  # one shift for every block (the usual case): a scalar
            self.new_inits.append(numpy_helper.from_array(shift3.flat[0:1].copy(), f"{name}_shift"))
        else:
            self.new_inits.append(
                numpy_helper.from_array(shift3.astype(np.uint8), f"{name}_shift_u8")
            )
            nodes.append(
                helper.make_node(
                    "Cast", [f"{name}_shift_u8"], [f"{name}_shift"], name=f"{name}_sc", to=cast
                )
            )
        nodes.extend(
            [
                helper.make_node(
                    "Mul", [f"{name}_shift", f"{name}_s3"], [f"{name}_centre"], name=f"{name}_m2"
                ),
                helper.make_node(
                    "Sub", [f"{name}_centre", f"{name}_minus"], [f"{name}_3d"], name=f"{name}_sub"
                ),
                helper.make_node(
                    "Reshape", [f"{name}_3d", f"{name}_shape"], [f"{name}_nb"], name=f"{name}_r"
                ),
                helper.make_node(
                    "Transpose", [f"{name}_nb"], [name], name=f"{name}_t", perm=[1, 0]
                ),
            ]
        )

    def replace(self, node: onnx.NodeProto, weight: str, blocks: Blocks) -> list[onnx.NodeProto]:
        """The nodes that compute ``node``'s output from ``blocks``."""
        n, k = blocks.shape
        x, y = node.input[0], node.output[0]
        base = weight.removesuffix(".T")
        b_name, s_name, z_name = f"{base}_Q{blocks.bits}", f"{base}_scales", f"{base}_zp"
        self.new_inits.append(numpy_helper.from_array(pack_codes(blocks), b_name))
        nodes: list[onnx.NodeProto] = []
        self._scales(s_name, blocks, nodes)
        inputs = [x, b_name, s_name]
        default_zp = 8 if blocks.bits == 4 else 128
        if np.any(blocks.zero_points != default_zp):
            self.new_inits.append(numpy_helper.from_array(pack_zero_points(blocks), z_name))
            inputs.append(z_name)
        attrs: dict[str, Any] = {
            "K": k,
            "N": n,
            "bits": blocks.bits,
            "block_size": blocks.block_size,
        }
        if self.accuracy_level is not None:
            attrs["accuracy_level"] = self.accuracy_level
        product = y if blocks.mins is None else f"{y}/nbits"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [product],
                name=f"{node.name}_Q{blocks.bits}",
                domain=_MS,
                **attrs,
            )
        )
        if blocks.mins is not None:
            sums = self._sums(x, k, blocks.block_size, nodes)
            m_name = f"{base}_block_mins"
            self._mins(m_name, blocks, s_name, nodes)  # [K/block, N]
            nodes.append(
                helper.make_node(
                    "MatMul", [sums, m_name], [f"{y}/mins"], name=f"{node.name}{MIN_TERM_SUFFIX}"
                )
            )
            nodes.append(
                helper.make_node("Add", [product, f"{y}/mins"], [y], name=f"{node.name}_add_mins")
            )
            self.min_terms += 1
        return nodes
