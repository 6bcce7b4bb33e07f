"""Block offsets folded into MatMulNBits' pre-packed weights of a prepared-session
cache entry: the exact GGUF bundles decode without their ~4 offset nodes per matrix.

**What.** A block format with a minimum (GGUF Q4_1, Q5_1, the K-quants) stands for
``w = (q - zp) * scale + m``; MatMulNBits has integer zero points only, so the bundle
computes ``y = MatMulNBits(x) + ReduceSum(Reshape(x, [.., K/b, b])) @ M`` with ``M`` the
``[K/b, N]`` fp32 block offsets (``edge_slm_quantize.blocks.BlockWriter``). In the
int8-activation kernel (``accuracy_level`` 4) onnxruntime's MLAS adds, per block,
``blksum(x_q) * BlkSum[b, n]`` with ``BlkSum = -zp * scale`` computed when the weight is
pre-packed and stored inside the pre-packed blob; this module adds ``M`` to those
entries in the blob a cache entry saved, so the one node computes ``x_q @ W`` (``x_q``:
the int8 activation blocks the kernel uses anyway), and removes the offset nodes from the
entry's graph. The bundle keeps its portable offset graph (cold loads, ``cache=False``,
other machines); only the cache entry, keyed by onnxruntime version and CPU, changes.

**Layout** (MLAS ``qnbitgemm.h``, ``PackedQuantBDataStruct`` on x86-64): the blob holds
the packed codes (``N * K/b * b * bits / 8`` bytes), then, at the next 64-byte boundary,
``BlkSum`` as fp32 ``[ceil(N/16), K/b, 16]`` (16 columns interleaved), then the scales.
onnxruntime writes ``0`` as every pre-packed blob's checksum (1.31.1) and does not check
it. The layout is not assumed: a node is folded only if its blob holds exactly
``-zp * scale`` (bit for bit, from the entry's own scales and zero points) where the
layout puts ``BlkSum``.

**Verification.** Before the entry is kept, every folded node is run by a probe graph over
the patched blobs with inputs whose int8 quantization is exact (integers up to 127 times
a power of two, one +-127 per block): each output must equal ``x @ W`` (``W`` from the
entry's codes, scales, zero points and ``M``, in float64) to fp32 rounding (measured
<= 1e-6 of ``|x| @ |W|``). Rows of 1 and 5 take the decode and prefill kernels. Any
mismatch, unknown layout or error restores the entry's files: the cache keeps the offset
graph, as before.

**Measured** (SmolLM2-135M-Instruct Q4_1, ``bundles/smollm2-fused-gguf``: 120 nodes
folded, 480 fewer; the shared 2-core x86-64 build machine at load average 3-4.8, so
wall-clock figures are noisy; ``benchmarks/bench_block_offsets.py``, details in
``docs/performance.md``): process CPU time per decode token at 1 thread 14.97 vs
17.21 ms (median of 10 paired ratios 0.85); decode at 2 threads 1.23x the offset graph
(median of 5 fresh-process rounds, 0.88-1.70); greedy 130 tokens equal. Perplexity (War
of the Worlds, 4,096 tokens) 35.720 vs 35.759 (fp32 35.640); ``gguf-head4`` 38.435 vs
38.475. Building the entry (once) took 2.2 s instead of 1.1 s, peak RSS 484 MiB instead
of 348 (two sessions alive); a hit is unchanged (152 vs 154 MiB).

**Limits.** onnxruntime 1.31.1 (the version tested: :data:`ORT_VERSIONS`) on x86-64 with
AVX-512 VNNI (the CPU tested); elsewhere (ARM NEON/KleidiAI lay out their blobs
differently, AVX2 is untested) entries keep the offset graph. ``EDGE_SLM_BLOCK_OFFSETS=0``
turns folding off (it is part of the cache key).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

# The module, not its names: prepared_cache imports this module while it initializes.
from edge_slm.engine import prepared_cache as cache

ENV = "EDGE_SLM_BLOCK_OFFSETS"
ORT_VERSIONS = ("1.31.1",)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
PROBE_FILE = "block-offsets-probe.onnx"
_MS = "com.microsoft"
_ALIGN = 64  # MLAS aligns the packed codes and BlkSum to 64 bytes on x86-64
_COLS = 16  # BlkSum interleaves 16 columns
_ROWS = (1, 5)  # probe rows: the M=1 decode kernel and the M>1 prefill path
_TOLERANCE = 1e-5  # of |x| @ |W|; measured <= 1e-6 when the blob is right
_FLOAT, _UINT8, _INT64 = 1, 2, 7  # TensorProto data types


def enabled() -> bool:
    """False when ``EDGE_SLM_BLOCK_OFFSETS`` is ``0`` (or ``false``/``no``/``off``)."""
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


def unsupported() -> str:
    """Why this onnxruntime/CPU is not one the blob layout was verified on ("" if it is)."""
    if ort.__version__ not in ORT_VERSIONS:
        return f"onnxruntime {ort.__version__} (tested: {', '.join(ORT_VERSIONS)})"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} (tested: x86_64 with AVX-512 VNNI)"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"CPU without {', '.join(missing)}" if missing else ""


# ------------------------------------------------------------------ graph reading
# The saved graph is read with prepared_cache's protobuf walker (the runtime does not
# depend on onnx). NodeProto: input 1, output 2, name 3, op_type 4, attribute 5, domain
# 7; AttributeProto: name 1, i 3; TensorProto: dims 1, data_type 2, name 8, raw_data 9,
# external_data 13; GraphProto: node 1, initializer 5, output 12, value_info 13.


@dataclass
class _Node:
    raw: bytes
    inputs: list[str]
    outputs: list[str]
    op: str
    domain: str
    ints: dict[str, int]


@dataclass
class _Tensor:
    raw: bytes
    dims: list[int]
    dtype: int
    inline: bytes | None
    external: dict[str, str] = field(default_factory=dict)


def _text(buf: bytes, start: int, end: int) -> str:
    return buf[start:end].decode("utf-8")


def _node(raw: bytes) -> _Node:
    node = _Node(raw, [], [], "", "", {})
    for number, wire, _, payload, end in cache._fields(raw):
        if wire != 2:
            continue
        if number == 1:
            node.inputs.append(_text(raw, payload, end))
        elif number == 2:
            node.outputs.append(_text(raw, payload, end))
        elif number == 4:
            node.op = _text(raw, payload, end)
        elif number == 7:
            node.domain = _text(raw, payload, end)
        elif number == 5:
            attr = raw[payload:end]
            name, value = "", None
            for a_num, a_wire, _, a_payload, a_end in cache._fields(attr):
                if a_num == 1 and a_wire == 2:
                    name = _text(attr, a_payload, a_end)
                elif a_num == 3 and a_wire == 0:
                    value, _ = cache._varint(attr, a_payload)
            if value is not None:
                node.ints[name] = value
    return node


def _tensor(raw: bytes) -> tuple[str, _Tensor]:
    name, tensor = "", _Tensor(raw, [], 0, None)
    for number, wire, _, payload, end in cache._fields(raw):
        if number == 1 and wire == 0:
            tensor.dims.append(cache._varint(raw, payload)[0])
        elif number == 1 and wire == 2:
            pos = payload
            while pos < end:
                dim, pos = cache._varint(raw, pos)
                tensor.dims.append(dim)
        elif number == 2 and wire == 0:
            tensor.dtype = cache._varint(raw, payload)[0]
        elif number == 8 and wire == 2:
            name = _text(raw, payload, end)
        elif number == 9 and wire == 2:
            tensor.inline = raw[payload:end]
        elif number == 13 and wire == 2:
            key, value = cache._entry(raw[payload:end])
            tensor.external[key] = value
    return name, tensor


class _Data:
    """The bytes of the entry's initializers (inline or in ``model.data``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / cache.DATA_FILE

    def read(self, tensor: _Tensor) -> bytes:
        if tensor.inline is not None:
            return tensor.inline
        if tensor.external.get("location") != cache.DATA_FILE:
            raise ValueError("an initializer outside the entry's data file")
        offset, length = int(tensor.external["offset"]), int(tensor.external["length"])
        with open(self.path, "rb") as data:
            data.seek(offset)
            chunk = data.read(length)
        if len(chunk) != length:
            raise ValueError("an initializer runs past the end of the data file")
        return chunk

    def array(self, tensor: _Tensor, dtype: type[np.generic]) -> np.ndarray:
        expected = {np.float32: _FLOAT, np.uint8: _UINT8, np.int64: _INT64}[dtype]
        if tensor.dtype != expected:
            raise ValueError(f"initializer of type {tensor.dtype}, expected {expected}")
        values = np.frombuffer(self.read(tensor), dtype=dtype)
        return values.reshape(tensor.dims) if tensor.dims else values


# ------------------------------------------------------------------ the pattern


@dataclass
class _Fold:
    """One offset term: ``nbits`` (MatMulNBits) -> ``add`` <- ``matmul(sums, offsets)``."""

    nbits: int  # node indices
    matmul: int
    add: int
    offsets: str  # the [K/b, N] initializer
    blob: tuple[int, int] = (0, 0)  # BlkSum's offset and length in model.data
    patched: bytes = b""
    scales: np.ndarray | None = None  # [N, K/b], for the probe
    shifts: np.ndarray | None = None  # [N, K/b] M - zp * scale, for the probe


def _find(nodes: list[_Node], inits: dict[str, _Tensor], outputs: set[str]) -> list[_Fold]:
    """Offset terms exactly as ``BlockWriter`` writes them (after onnxruntime's folding)."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.outputs}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.inputs:
            consumers.setdefault(name, []).append(i)
    b_users: dict[str, int] = {}
    for node in nodes:
        if node.op == "MatMulNBits" and len(node.inputs) > 1:
            b_users[node.inputs[1]] = b_users.get(node.inputs[1], 0) + 1
    found = []
    for i, node in enumerate(nodes):
        if node.op != "MatMulNBits" or node.domain != _MS or len(node.outputs) != 1:
            continue
        if node.ints.get("accuracy_level") != 4 or node.ints.get("bits") not in (4, 8):
            continue
        if len(node.inputs) not in (3, 4) or b_users.get(node.inputs[1]) != 1:
            continue
        product = node.outputs[0]
        users = consumers.get(product, [])
        if product in outputs or len(users) != 1 or nodes[users[0]].op != "Add":
            continue
        add = nodes[users[0]]
        if len(add.inputs) != 2 or add.domain not in ("", "ai.onnx"):
            continue
        other = add.inputs[1] if add.inputs[0] == product else add.inputs[0]
        mm_index = producer.get(other)
        if mm_index is None or len(consumers.get(other, [])) != 1 or other in outputs:
            continue
        matmul = nodes[mm_index]
        if matmul.op != "MatMul" or matmul.domain not in ("", "ai.onnx") or len(matmul.inputs) != 2:
            continue
        sums, offsets = matmul.inputs
        k, n, block = node.ints.get("K", 0), node.ints.get("N", 0), node.ints.get("block_size", 0)
        tensor = inits.get(offsets)
        if tensor is None or tensor.dtype != _FLOAT or tensor.dims != [k // block, n]:
            continue
        if not block or k % block:
            continue
        if not _block_sums_of(nodes, producer, inits, sums, node.inputs[0], k, block):
            continue
        found.append(_Fold(i, mm_index, users[0], offsets))
    return found


def _block_sums_of(
    nodes: list[_Node],
    producer: dict[str, int],
    inits: dict[str, _Tensor],
    sums: str,
    x: str,
    k: int,
    block: int,
) -> bool:
    """``sums`` is ``ReduceSum(Reshape(x, [0, 0, K/b, b]), [-1], keepdims=0)``."""
    reduce_index = producer.get(sums)
    if reduce_index is None:
        return False
    reduce = nodes[reduce_index]
    if reduce.op != "ReduceSum" or reduce.ints.get("keepdims", 1) != 0 or len(reduce.inputs) != 2:
        return False
    reshape_index = producer.get(reduce.inputs[0])
    if reshape_index is None or nodes[reshape_index].op != "Reshape":
        return False
    reshape = nodes[reshape_index]
    if len(reshape.inputs) != 2 or reshape.inputs[0] != x:
        return False
    shape, axes = inits.get(reshape.inputs[1]), inits.get(reduce.inputs[1])
    if shape is None or axes is None or shape.dtype != _INT64 or axes.dtype != _INT64:
        return False
    shape_values = [int(v) for v in np.frombuffer(shape.inline or b"", np.int64)]
    axes_values = [int(v) for v in np.frombuffer(axes.inline or b"", np.int64)]
    return shape_values[-2:] == [k // block, block] and axes_values == [-1]


# ------------------------------------------------------------------ the blobs


def _codes(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    """MatMulNBits ``B`` -> ``[N, K]`` fp32 codes (4-bit: element 2i low nibble, 2i+1 high)."""
    flat = packed.reshape(n, -1)
    if bits == 8:
        return flat[:, :k].astype(np.float32)
    out = np.empty((n, flat.shape[1] * 2), np.float32)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out[:, :k]


def _zero_points(
    node: _Node, inits: dict[str, _Tensor], data: _Data, n: int, nb: int
) -> np.ndarray:
    """``[N, K/b]`` zero points (the default 8 / 128 without the input)."""
    bits = node.ints["bits"]
    if len(node.inputs) < 4 or not node.inputs[3]:
        return np.full((n, nb), 8 if bits == 4 else 128, np.float32)
    packed = data.array(inits[node.inputs[3]], np.uint8).reshape(n, -1)
    if bits == 8:
        return packed[:, :nb].astype(np.float32)
    both = np.empty((n, packed.shape[1] * 2), np.uint8)
    both[:, 0::2], both[:, 1::2] = packed & 0x0F, packed >> 4
    return both[:, :nb].astype(np.float32)


def _interleave(values: np.ndarray) -> np.ndarray:
    """``[N, K/b]`` -> BlkSum's ``[ceil(N/16), K/b, 16]`` (padding columns zero)."""
    n, nb = values.shape
    padded = np.zeros((-(-n // _COLS) * _COLS, nb), np.float32)
    padded[:n] = values
    return np.ascontiguousarray(padded.reshape(-1, _COLS, nb).transpose(0, 2, 1))


def _prepare(fold: _Fold, nodes: list[_Node], inits: dict[str, _Tensor], data: _Data) -> str:
    """Locate ``fold``'s BlkSum in its blob and compute the patched bytes; "" or why not."""
    node = nodes[fold.nbits]
    k, n, bits, block = (node.ints.get(a, 0) for a in ("K", "N", "bits", "block_size"))
    nb = -(-k // block)
    b = inits.get(node.inputs[1])
    scales_t = inits.get(node.inputs[2])
    if b is None or scales_t is None:
        return "weights are not initializers"
    prepacked = [v for key, v in b.external.items() if key.startswith("prepacked")]
    if len(prepacked) != 1 or len(prepacked[0].split("|")) != 2:
        return "not one pre-packed blob"
    offset, length, _ = (int(x) for x in prepacked[0].split("|")[1].split(";"))
    if offset % _ALIGN:
        return "blob not 64-byte aligned"
    start = n * nb * block * bits // 8
    start += -start % _ALIGN
    scales = data.array(scales_t, np.float32).reshape(n, nb)
    zp = _zero_points(node, inits, data, n, nb)
    expected = _interleave(-scales * zp)
    if start + expected.nbytes > length:
        return "blob smaller than the layout"
    with open(data.path, "rb") as file:
        file.seek(offset + start)
        stored = np.frombuffer(file.read(expected.nbytes), np.float32).reshape(expected.shape)
    real = _interleave(np.ones((n, nb), np.float32)).astype(bool)  # not the padding columns
    if not np.array_equal(stored[real], expected[real]):
        return "BlkSum not where the layout puts it"
    offsets = data.array(inits[fold.offsets], np.float32)  # [K/b, N]
    fold.patched = (stored + _interleave(np.ascontiguousarray(offsets.T))).tobytes()
    fold.blob = (offset + start, expected.nbytes)
    # W[n, k] = codes * scale + (M - zp * scale) per block (the codes read by the probe)
    fold.scales, fold.shifts = scales, offsets.T - zp * scales
    return ""


def _reference(
    fold: _Fold, node: _Node, packed: np.ndarray, ints: np.ndarray, powers: np.ndarray
) -> np.ndarray:
    """``x @ W.T`` and a bound of ``|x| @ |W|.T`` (``[2, rows, N]`` float64) for
    ``x = ints * powers`` (``[rows, K/b, b]`` integers, ``[rows, K/b, 1]`` powers of two)
    and ``W = codes * scale + (M - zp * scale)`` per block: the block dot products of
    integers are exact in fp32 (below 2^24)."""
    scales, shifts = fold.scales, fold.shifts  # [N, K/b]
    assert scales is not None and shifts is not None
    n, bits = node.ints["N"], node.ints["bits"]
    nb, block = scales.shape[1], ints.shape[2]
    codes = _codes(packed, bits, n, nb * block).reshape(n, nb, block)
    codes = np.ascontiguousarray(codes.transpose(1, 2, 0))  # [K/b, b, N]: BLAS-friendly
    per_block = ints.transpose(1, 0, 2)  # [K/b, rows, b]
    dots = np.matmul(per_block, codes).astype(np.float64)  # [K/b, rows, N]
    sizes = np.matmul(np.abs(per_block), codes).astype(np.float64)
    sums = ints.sum(axis=2).T[..., None].astype(np.float64)  # [K/b, rows, 1]
    spans = np.abs(ints).sum(axis=2).T[..., None].astype(np.float64)
    power = powers[..., 0].T[..., None].astype(np.float64)  # [K/b, rows, 1]
    scale, shift = scales.T[:, None, :].astype(np.float64), shifts.T[:, None, :].astype(np.float64)
    ref = (power * (dots * scale + sums * shift)).sum(axis=0)
    bound = (power * (sizes * np.abs(scale) + spans * np.abs(shift))).sum(axis=0)
    return np.stack([ref, bound])


# ------------------------------------------------------------------ rewriting


def _field(field_number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return (
        cache._encode_varint(field_number << 3 | 2) + cache._encode_varint(len(payload)) + payload
    )


def _string(field_number: int, text: str) -> bytes:
    return _field(field_number, text.encode("utf-8"))


def _with_io(node: _Node, inputs: list[str], outputs: list[str]) -> bytes:
    """``node``'s bytes with its inputs and outputs replaced."""
    body = b"".join(
        node.raw[start:end]
        for number, wire, start, _, end in cache._fields(node.raw)
        if not (wire == 2 and number in (1, 2))
    )
    return b"".join(_string(1, i) for i in inputs) + b"".join(_string(2, o) for o in outputs) + body


def _rewrite(model: bytes, nodes: list[_Node], folds: list[_Fold], outputs: set[str]) -> bytes:
    """The graph without the folded offset terms: each MatMulNBits writes its Add's
    output; the MatMul, Add, their offsets and the block sums (ReduceSum, Reshape) no
    other node reads are dropped, with their initializers and value infos."""
    drop = {f.add for f in folds} | {f.matmul for f in folds}
    rename = {f.nbits: nodes[f.add].outputs[0] for f in folds}
    while True:  # block sums whose last reader was dropped
        read = {name for i, node in enumerate(nodes) if i not in drop for name in node.inputs}
        orphans = {
            i
            for i, node in enumerate(nodes)
            if i not in drop
            and node.op in ("ReduceSum", "Reshape")
            and not any(out in read or out in outputs for out in node.outputs)
        }
        if not orphans:
            break
        drop |= orphans
    read = {name for i, node in enumerate(nodes) if i not in drop for name in node.inputs}
    gone = {name for i in drop for name in (*nodes[i].inputs, *nodes[i].outputs)}
    gone |= {nodes[f.nbits].outputs[0] for f in folds}
    gone -= read | outputs | set(rename.values())

    def graph(buf: bytes) -> bytes:
        out = bytearray()
        index = 0
        for number, wire, start, payload, end in cache._fields(buf):
            if number == 1 and wire == 2:
                i, index = index, index + 1
                if i in drop:
                    continue
                if i in rename:
                    out += _field(1, _with_io(nodes[i], nodes[i].inputs, [rename[i]]))
                    continue
            elif number in (5, 13) and wire == 2:
                name = _name_of(buf[payload:end], 8 if number == 5 else 1)
                if name in gone:
                    continue
            out += buf[start:end]
        return bytes(out)

    return cache._map_fields(model, 7, graph)


def _name_of(buf: bytes, field_number: int) -> str:
    for number, wire, _, payload, end in cache._fields(buf):
        if number == field_number and wire == 2:
            return _text(buf, payload, end)
    return ""


def _probe_model(
    model: bytes, nodes: list[_Node], inits: dict[str, _Tensor], folds: list[_Fold]
) -> bytes:
    """A graph of the folded MatMulNBits alone, input ``x{i}`` -> output ``y{i}``, over
    the entry's initializers (the same pre-packed blobs in ``model.data``)."""
    header = b"".join(
        model[start:end] for number, _, start, _, end in cache._fields(model) if number in (1, 8)
    )  # ir_version, opset_import
    graph = bytearray(_string(2, "block-offsets-probe"))
    names: set[str] = set()
    for i, fold in enumerate(folds):
        node = nodes[fold.nbits]
        new = _with_io(node, [f"x{i}", *node.inputs[1:]], [f"y{i}"])
        graph += _field(1, new)
        names.update(n for n in node.inputs[1:] if n)
    for name in sorted(names):
        raw = inits[name].raw
        graph += _field(5, raw)
    for i, fold in enumerate(folds):
        k = nodes[fold.nbits].ints["K"]
        n = nodes[fold.nbits].ints["N"]
        graph += _value_info(11, f"x{i}", k) + _value_info(12, f"y{i}", n)
    return header + _field(7, bytes(graph))


def _value_info(field_number: int, name: str, width: int) -> bytes:
    """ValueInfoProto of a float ``[rows, width]`` tensor (rows symbolic)."""
    rows = _string(2, "rows")  # Dimension.dim_param
    cols = b"\x08" + cache._encode_varint(width)  # Dimension.dim_value
    shape = b"".join(_field(1, d) for d in (rows, cols))
    tensor = b"\x08\x01" + _field(2, shape)
    type_proto = _field(1, tensor)
    info = _string(1, name) + _field(2, type_proto)
    return _field(field_number, info)


def _exact_inputs(
    rows: int, k: int, block: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs the kernel quantizes to int8 without rounding: ``[rows, K/b, b]`` integers
    in [-127, 127] with one +-127 per block, and ``[rows, K/b, 1]`` powers of two."""
    ints = rng.integers(-127, 128, size=(rows, k // block, block)).astype(np.float32)
    ints[:, :, 0] = np.where(rng.random((rows, k // block)) < 0.5, -127.0, 127.0)
    powers = np.exp2(rng.integers(-9, 1, size=(rows, k // block, 1))).astype(np.float32)
    return ints, powers


def _probe(
    data: _Data, model: bytes, nodes: list[_Node], inits: dict[str, _Tensor], folds: list[_Fold]
) -> str:
    """Run the folded nodes on exact-quantizing inputs; "" if each is ``x @ W``."""
    path = data.path.parent / PROBE_FILE
    path.write_bytes(_probe_model(model, nodes, inits, folds))
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=[cache.PROVIDER])
        rng = np.random.default_rng(0)
        names = [f"y{i}" for i in range(len(folds))]
        inputs = [
            _exact_inputs(
                sum(_ROWS), nodes[f.nbits].ints["K"], nodes[f.nbits].ints["block_size"], rng
            )
            for f in folds
        ]
        xs = [(ints * powers).reshape(sum(_ROWS), -1) for ints, powers in inputs]
        outputs: list[list[np.ndarray]] = [[] for _ in folds]
        first = 0
        for rows in _ROWS:  # the decode kernel, then the prefill path
            feeds = {f"x{i}": x[first : first + rows] for i, x in enumerate(xs)}
            for i, y in enumerate(session.run(names, feeds)):
                outputs[i].append(y)
            first += rows
        for fold, got, (ints, powers) in zip(folds, outputs, inputs, strict=True):
            packed = data.array(inits[nodes[fold.nbits].inputs[1]], np.uint8)  # MatMulNBits B
            ref, bound = _reference(fold, nodes[fold.nbits], packed, ints, powers)
            error = float(np.abs(np.concatenate(got) - ref).max() / bound.max())
            if not error <= _TOLERANCE:
                return f"{nodes[fold.nbits].outputs[0]}: {error:.1e} of |x||W| off x @ W"
        return ""
    finally:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Folded:
    """What :func:`fold_block_offsets` did.

    Attributes:
        nodes: how many MatMulNBits took their block offsets (0: the entry is unchanged).
        detail: a few words for the entry record and ``edge-slm bench``.
    """

    nodes: int
    detail: str


def fold_block_offsets(
    folder: Path, open_session: Callable[[Path], ort.InferenceSession]
) -> tuple[Folded, ort.InferenceSession | None]:
    """Fold the block offsets of the entry in ``folder`` (``model.onnx`` + aligned
    ``model.data`` as :mod:`edge_slm.engine.prepared_cache` builds it) into the
    pre-packed weights and drop the offset nodes, verified by a probe (module docstring).

    Returns what was done and the session of the folded entry (opened with
    ``open_session``), or ``(Folded(0, why not), None)`` with the files unchanged.
    """
    if not enabled():
        return Folded(0, f"block offsets not folded: {ENV}=0"), None
    why = unsupported()
    if why:
        return Folded(0, f"block offsets not folded: {why}"), None
    graph_path = folder / cache.GRAPH_FILE
    model = graph_path.read_bytes()
    data = _Data(folder)
    originals: list[tuple[int, bytes]] = []
    try:
        nodes, inits, outputs = _parse(model)
        folds = _find(nodes, inits, outputs)
        if not folds:
            return Folded(0, "no block offsets to fold"), None
        kept = []
        for fold in folds:
            if not _prepare(fold, nodes, inits, data):
                kept.append(fold)
        if not kept:
            return Folded(0, "block offsets not folded: unknown pre-packed layout"), None
        with open(data.path, "r+b") as file:
            for fold in kept:
                offset, length = fold.blob
                file.seek(offset)
                originals.append((offset, file.read(length)))
                file.seek(offset)
                file.write(fold.patched)
        problem = _probe(data, model, nodes, inits, kept)
        if problem:
            raise ValueError(f"probe mismatch at {problem}")
        graph_path.write_bytes(_rewrite(model, nodes, kept, outputs))
        session = open_session(graph_path)
        return Folded(len(kept), f"block offsets folded into {len(kept)} MatMulNBits"), session
    except Exception as exc:  # anything unexpected: the entry keeps its offset graph
        _restore(folder, model, originals)
        return Folded(0, f"block offsets not folded: {str(exc).strip()[:160]}"), None


def _restore(folder: Path, model: bytes, originals: list[tuple[int, bytes]]) -> None:
    (folder / cache.GRAPH_FILE).write_bytes(model)
    (folder / PROBE_FILE).unlink(missing_ok=True)
    if originals:
        with open(folder / cache.DATA_FILE, "r+b") as file:
            for offset, chunk in originals:
                file.seek(offset)
                file.write(chunk)


def _parse(model: bytes) -> tuple[list[_Node], dict[str, _Tensor], set[str]]:
    """The graph's nodes in order, its initializers by name and its output names."""
    nodes: list[_Node] = []
    inits: dict[str, _Tensor] = {}
    outputs: set[str] = set()
    for number, wire, _, payload, end in cache._fields(model):
        if number != 7 or wire != 2:
            continue
        graph = model[payload:end]
        for g_num, g_wire, _, g_payload, g_end in cache._fields(graph):
            if g_wire != 2:
                continue
            if g_num == 1:
                nodes.append(_node(graph[g_payload:g_end]))
            elif g_num == 5:
                name, tensor = _tensor(graph[g_payload:g_end])
                inits[name] = tensor
            elif g_num == 12:
                outputs.add(_name_of(graph[g_payload:g_end], 1))
    return nodes, inits, outputs
