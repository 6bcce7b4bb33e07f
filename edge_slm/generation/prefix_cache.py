"""Prefix-cache files: the KV cache of a fixed prefix (a long system prompt) on disk.

A file is an ``.npz`` of arrays only (no pickle): the token ids, the keys and values of
every layer ``[1, kv_heads, n, head_dim]``, the sha256 of the bundle's graph (a cache
made for another model is refused) and the sha256 of its own arrays (a corrupted file is
refused; files written before it existed load without it). Everything is checked from
the zip directory and the ``.npy`` headers before an array is read. :class:`SavedPrefix` is the loaded, read-only
form a model keeps and its conversations copy from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import DecoderIO
from edge_slm.errors import BundleError


@dataclass(frozen=True)
class SavedPrefix:
    """A prefix's token ids and KV arrays (never modified once made)."""

    tokens: tuple[int, ...]
    keys: list[np.ndarray]  # per layer [1, kv_heads, n, head_dim]
    values: list[np.ndarray]

    def shared_with(self, ids: Sequence[int], limit: int) -> int:
        """How many leading ids (at most ``limit``) equal this prefix's."""
        return shared_length(self.tokens, ids, limit)


def shared_length(cached: Sequence[int], ids: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``cached`` and ``ids``, at most ``limit``."""
    n = 0
    for a, b in zip(cached[:limit], ids[:limit], strict=False):
        if a != b:
            break
        n += 1
    return n


def save_prefix(path: Path, prefix: SavedPrefix, model_sha256: str) -> Path:
    """Write ``prefix`` to ``path`` with the graph's sha256."""
    arrays: dict[str, Any] = {f"key_{i}": k for i, k in enumerate(prefix.keys)}
    arrays.update({f"value_{i}": v for i, v in enumerate(prefix.values)})
    tokens = np.asarray([prefix.tokens], dtype=np.int64)
    digest = _content_sha256(tokens, prefix.keys, prefix.values)
    with open(path, "wb") as fh:
        np.savez(
            fh,
            tokens=tokens,
            model_sha256=np.asarray(model_sha256),
            content_sha256=np.asarray(digest),
            **arrays,
        )
    return path


def _content_sha256(tokens: np.ndarray, keys: list[np.ndarray], values: list[np.ndarray]) -> str:
    """sha256 over the token ids and every KV array (what a flipped byte would change)."""
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    for array in [*keys, *values]:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


_HEADER_SLACK = 1 << 16  # .npy headers, zip directory, the sha256 strings
_OPTIONAL = ("content_sha256",)  # files written before it was added have none


def _npz_headers(path: Path, limit: int, wanted: set[str]) -> dict[str, tuple[Any, ...]]:
    """(shape, dtype, uncompressed size) of every array of an ``.npz``, read from the
    zip directory and the ``.npy`` headers only, before any array is read."""
    import zipfile

    out: dict[str, tuple[Any, ...]] = {}
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        optional = {f"{n}.npy" for n in _OPTIONAL}
        expected = {f"{n}.npy" for n in wanted}
        if len(names) != len(set(names)) or not expected <= set(names) <= expected | optional:
            extra = sorted(set(names) - expected - optional)
            missing = sorted(expected - set(names))
            raise BundleError(
                f"prefix cache {str(path)!r} holds other arrays than expected "
                f"(unexpected {extra[:4]}, missing {missing[:4]}, or duplicates)"
            )
        total = 0
        for info in infos:
            total += info.file_size
            if info.file_size > limit or total > limit:
                raise BundleError(
                    f"prefix cache {str(path)!r} declares {total} bytes uncompressed, more than "
                    f"this model's largest prefix ({limit} bytes)"
                )
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise BundleError(f"prefix cache {str(path)!r}: .npy version {version}")
            if dtype.hasobject:
                raise BundleError(f"prefix cache {str(path)!r} holds object arrays (refused)")
            out[info.filename[: -len(".npy")]] = (tuple(shape), dtype, info.file_size, fortran)
    return out


def load_prefix(
    path: Path, io: DecoderIO, kv_dtype: type[np.floating], model_sha256: str, context_length: int
) -> SavedPrefix:
    """Read a prefix-cache file made for this graph.

    The file's size, its zip directory and every array's ``.npy`` header (names, shape,
    dtype, uncompressed size) are checked before any array is read, so a small file
    that would decompress to gigabytes, or declares shapes of another model, is refused
    without allocating.

    Raises:
        BundleError: the file is not a prefix cache, or not one of this graph.
    """
    itemsize = np.dtype(kv_dtype).itemsize
    per_position = 2 * io.num_layers * io.num_kv_heads * io.head_dim * itemsize + 8
    limit = per_position * context_length + _HEADER_SLACK
    where = f"prefix cache {str(path)!r}"
    try:
        size = Path(path).stat().st_size
        if size > limit:
            raise BundleError(f"{where} has {size} bytes, more than this model's largest prefix")
        wanted = {"tokens", "model_sha256"}
        wanted |= {f"{kind}_{i}" for kind in ("key", "value") for i in range(io.num_layers)}
        headers = _npz_headers(Path(path), limit, wanted)
        shape, dtype, _, _ = headers["tokens"]
        if (
            dtype != np.int64
            or len(shape) != 2
            or shape[0] != 1
            or not 0 < shape[1] < context_length
        ):
            raise BundleError(f"{where} has a token array that does not fit ({shape}, {dtype})")
        expected = (1, io.num_kv_heads, shape[1], io.head_dim)
        sha_shape, sha_dtype, _, _ = headers["model_sha256"]
        if sha_shape != () or sha_dtype.kind != "U" or sha_dtype.itemsize > 4 * 128:
            raise BundleError(f"{where} has no sha256 string")
        with np.load(path, allow_pickle=False) as data:
            if str(data["model_sha256"]) != model_sha256:
                raise BundleError(f"{where} was made for another model")
            for name, (a_shape, a_dtype, _, _) in headers.items():
                kv = name.startswith(("key_", "value_"))
                if kv and (a_shape != expected or a_dtype != kv_dtype):
                    raise BundleError(f"{where} has shapes that do not fit this model")
            tokens = np.asarray(data["tokens"], dtype=np.int64)
            keys = [np.asarray(data[f"key_{i}"]) for i in range(io.num_layers)]
            values = [np.asarray(data[f"value_{i}"]) for i in range(io.num_layers)]
            if "content_sha256" in headers:
                c_shape, c_dtype, _, _ = headers["content_sha256"]
                if c_shape != () or c_dtype.kind != "U":
                    raise BundleError(f"{where} has a malformed content_sha256")
                recorded = str(data["content_sha256"])
                if recorded != _content_sha256(tokens, keys, values):
                    raise BundleError(f"{where} is corrupt: its arrays do not match their sha256")
    except BundleError:
        raise
    except Exception as exc:  # zip, zlib, npy header, I/O: all one story
        raise BundleError(f"{str(path)!r} is not a valid prefix cache: {exc}") from None
    if tokens.ndim != 2 or tokens.shape[0] != 1 or not 0 < tokens.shape[1] < context_length:
        raise BundleError(f"{where} has a token array that does not fit")
    if tokens.min() < 0:
        raise BundleError(f"{where} holds negative token ids")
    if any(a.shape != expected or a.dtype != kv_dtype for a in keys + values):
        raise BundleError(f"{where} has shapes that do not fit this model")
    return SavedPrefix(tuple(int(t) for t in tokens[0]), keys, values)
