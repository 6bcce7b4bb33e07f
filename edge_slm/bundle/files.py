"""A bundle's files on disk: checksums, reading and writing ``manifest.json``.

:func:`read_bundle` is the runtime's way in: it parses the manifest, refuses unknown
format versions (via :class:`~edge_slm.bundle.manifest.Manifest`) and, with ``verify``,
checks every file's sha256 before anything is handed to onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from edge_slm.bundle import limits
from edge_slm.bundle.hash_record import FileHashes
from edge_slm.bundle.manifest import MANIFEST_FILE, Manifest, check_file_name
from edge_slm.errors import BundleError, ChecksumError

_HASH_CHUNK = 1 << 22  # 4 MiB


class BundleWarning(UserWarning):
    """Something in a bundle folder is ignored (a file the manifest does not list)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks.

    Plain reads, not a memory map: a file cut short while it is hashed (a removed USB
    stick, a concurrent writer) then gives a short read and a checksum error, never a
    SIGBUS.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(folder: Path) -> list[str]:
    """Every regular file of a bundle except the manifest, as sorted relative paths."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``folder``, adding the sha256 of every other file.

    Call it last, once every file of the bundle is in place.
    """
    folder = Path(folder)
    data = manifest.to_dict()
    data["checksums"] = {name: sha256_file(folder / name) for name in bundle_files(folder)}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _inside(folder: Path, name: str, where: str) -> Path:
    """``folder/name`` resolved, refused unless it stays inside ``folder`` (a symlink
    leading out included)."""
    root = folder.resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise BundleError(f"{where} {name!r} leads outside the bundle (to {str(path)!r})")
    return path


def check_checksums(checksums: Any) -> dict[str, str]:
    """The manifest's ``checksums`` object, every name a plain relative path."""
    if not isinstance(checksums, dict) or not checksums:
        raise BundleError("manifest has no 'checksums' object")
    if len(checksums) > limits.MAX_FILES:
        raise BundleError(f"manifest lists {len(checksums)} files, more than {limits.MAX_FILES}")
    for name, digest in checksums.items():
        check_file_name(name, "manifest checksums", nested=True)
        if name == MANIFEST_FILE:
            raise BundleError("manifest checksums may not list manifest.json itself")
        if not isinstance(digest, str) or len(digest) != 64:
            raise BundleError(f"manifest checksum of {name!r} is not a hex sha256: {digest!r}")
        try:
            int(digest, 16)
        except ValueError:
            raise BundleError(
                f"manifest checksum of {name!r} is not a hex sha256: {digest!r}"
            ) from None
    return cast(dict[str, str], checksums)


def _check_sizes(folder: Path, manifest: Manifest) -> None:
    """Refuse files that are too large by their size alone (before hashing them)."""
    tokenizer = folder / manifest.files["tokenizer"]
    try:
        size = tokenizer.stat().st_size
    except OSError:
        return  # missing: said by the checksum check
    if size > limits.MAX_TOKENIZER_BYTES:
        raise BundleError(
            f"bundle tokenizer {manifest.files['tokenizer']!r} has {size} bytes, more than "
            f"the limit of {limits.MAX_TOKENIZER_BYTES} (edge_slm.bundle.limits)"
        )


def verify_checksums(folder: Path, checksums: Any, hashes: FileHashes | None = None) -> None:
    """Raise ChecksumError unless every listed file exists with its recorded sha256.

    Names are checked first (plain names inside the folder; a symlink leading out is
    refused). Files present in the folder but absent from the list are ignored with a
    :class:`BundleWarning` and never read: a bundle is what its manifest says.

    ``hashes``: a signed record of files hashed before (:mod:`edge_slm.bundle.hash_record`);
    a file whose size, mtime, ctime, inode and device all match its record is not read
    again. None: every file is hashed.
    """
    checksums = check_checksums(checksums)
    _check_present(folder, checksums)
    _verify_files(folder, checksums, hashes)


def _check_present(folder: Path, checksums: dict[str, str]) -> None:
    for name in checksums:
        path = _inside(folder, name, "checksum entry")
        if not path.is_file():
            raise ChecksumError(f"bundle file {name!r} is missing")


def _verify_files(folder: Path, checksums: dict[str, str], hashes: FileHashes | None) -> None:
    for name, expected in checksums.items():
        path = _inside(folder, name, "checksum entry")
        actual = sha256_file(path) if hashes is None else hashes.sha256(path, expected)
        if actual != expected:
            raise ChecksumError(
                f"bundle file {name!r} is corrupt or was modified: sha256 {actual} "
                f"!= {expected} recorded in the manifest"
            )


def warn_unlisted(folder: Path, checksums: dict[str, str]) -> list[str]:
    """Warn (:class:`BundleWarning`) about files the manifest does not list; they are
    ignored, never read. Returns their names."""
    try:
        extra = sorted(set(bundle_files(folder)) - set(checksums))
    except OSError:
        return []
    if extra:
        shown = extra[:5] + (["..."] if len(extra) > 5 else [])
        warnings.warn(
            f"bundle {str(folder)!r} holds files its manifest does not list, ignored: {shown}",
            BundleWarning,
            stacklevel=3,
        )
    return extra


def _depth_ok(text: str, limit: int) -> bool:
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def read_manifest(folder: str | Path) -> tuple[Manifest, dict[str, str]]:
    """Parse ``manifest.json`` without checking files; returns (manifest, checksums)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise BundleError(f"bundle folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise BundleError(f"{str(folder)!r} is not a bundle: it has no {MANIFEST_FILE}")
    _inside(folder, MANIFEST_FILE, "the manifest")
    try:
        size = path.stat().st_size
        if size > limits.MAX_MANIFEST_BYTES:
            raise BundleError(
                f"{path} has {size} bytes, more than the limit of {limits.MAX_MANIFEST_BYTES}"
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path} is not valid UTF-8: {exc}") from None
    except OSError as exc:
        raise BundleError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not _depth_ok(text, limits.MAX_JSON_DEPTH):
        raise BundleError(f"{path} nests deeper than {limits.MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    data = dict(data)
    checksums = data.pop("checksums", None)
    manifest = Manifest.from_dict(data)
    return manifest, cast(dict[str, str], checksums)


# ONNX external data: ModelProto.graph (7) -> GraphProto.initializer (5) ->
# TensorProto.external_data (13) -> StringStringEntryProto key (1) / value (2). A
# read-only walk over a memory map (the runtime does not depend on onnx).


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, wanted: frozenset[int]) -> Iterator[tuple[int, memoryview]]:
    """(number, bytes) of each length-delimited field of ``buf`` numbered in ``wanted``,
    in order; every other field is skipped. One pass whatever ``wanted`` holds; a tag
    or length below 128 (nearly all of them) is read without a call."""
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 2:
            if pos < end and buf[pos] < 0x80:
                length = buf[pos]
                pos += 1
            else:
                length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated protobuf message")
            if tag >> 3 in wanted:
                yield tag >> 3, buf[pos : pos + length]
            pos += length
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos > end:
        raise ValueError("truncated protobuf message")


def _submessages(buf: memoryview, want: int) -> Iterator[memoryview]:
    for _, sub in _fields(buf, frozenset((want,))):
        yield sub


_TENSOR_EXTERNAL = frozenset((13,))  # TensorProto.external_data
_ENTRY = frozenset((1, 2))  # StringStringEntryProto key / value
_SPARSE = frozenset((1, 2))  # SparseTensorProto values / indices
_NODE = frozenset((5,))  # NodeProto.attribute
# AttributeProto: t (5) / tensors (10), sparse_tensor (22) / sparse_tensors (23),
# g (6) / graphs (11): If / Loop / Scan bodies
_ATTRIBUTE = frozenset((5, 10, 22, 23, 6, 11))
_GRAPH = frozenset((5, 15, 1))  # GraphProto initializer, sparse_initializer, node
_MODEL = frozenset((7, 25))  # ModelProto graph, functions
_FUNCTION = frozenset((7,))  # FunctionProto.node


def _tensor_locations(tensor: memoryview, names: list[str]) -> None:
    for _, entry in _fields(tensor, _TENSOR_EXTERNAL):
        key, value = b"", b""
        for number, part in _fields(entry, _ENTRY):
            if number == 1:
                key += bytes(part)
            else:
                value += bytes(part)
        if key == b"location":
            names.append(value.decode("utf-8"))


def _sparse_locations(sparse: memoryview, names: list[str]) -> None:
    for _, tensor in _fields(sparse, _SPARSE):
        _tensor_locations(tensor, names)


def _node_locations(node: memoryview, names: list[str], depth: int) -> None:
    for _, attribute in _fields(node, _NODE):
        for number, part in _fields(attribute, _ATTRIBUTE):
            if number in (5, 10):
                _tensor_locations(part, names)
            elif number in (22, 23):
                _sparse_locations(part, names)
            else:
                _graph_locations(part, names, depth + 1)


def _graph_locations(graph: memoryview, names: list[str], depth: int = 0) -> None:
    if depth > 32:
        raise ValueError("subgraphs nest deeper than 32 levels")
    for number, part in _fields(graph, _GRAPH):
        if number == 5:
            _tensor_locations(part, names)
        elif number == 15:
            _sparse_locations(part, names)
        else:  # a node: Constant values, subgraphs
            _node_locations(part, names, depth)


def _locations(view: memoryview) -> list[str]:
    """Every external-data location of a ModelProto: initializers, sparse
    initializers, node attributes (Constant), subgraphs and functions' nodes."""
    names: list[str] = []
    for number, part in _fields(view, _MODEL):
        if number == 7:
            _graph_locations(part, names)
        else:
            for _, node in _fields(part, _FUNCTION):
                _node_locations(node, names, 1)
    return names


POSITION_TABLES = ("cos_cache", "sin_cache", "wpe.weight")
"""Initializers of the fused graphs whose first dimension is the positions they cover."""


def _dims(tensor: memoryview) -> tuple[str, list[int]]:
    name = b"".join(bytes(n) for n in _submessages(tensor, 8)).decode("utf-8", "replace")
    dims: list[int] = []
    pos, end = 0, len(tensor)
    while pos < end:  # TensorProto.dims (1): varints, packed or not
        tag, pos = _varint(tensor, pos)
        field, wire = tag >> 3, tag & 7
        if field == 1 and wire == 0:
            value, pos = _varint(tensor, pos)
            dims.append(value)
        elif field == 1 and wire == 2:
            length, pos = _varint(tensor, pos)
            stop = pos + length
            while pos < stop:
                value, pos = _varint(tensor, pos)
                dims.append(value)
        elif wire == 0:
            _, pos = _varint(tensor, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(tensor, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return name, dims


def _find_dims(view: memoryview, names: tuple[str, ...]) -> dict[str, list[int]]:
    wanted = {name.encode("utf-8") for name in names}
    found: dict[str, list[int]] = {}
    for graph in _submessages(view, 7):
        for tensor in _submessages(graph, 5):
            # the name alone first: the dims of the few wanted tensors only
            if b"".join(bytes(part) for part in _submessages(tensor, 8)) in wanted:
                name, dims = _dims(tensor)
                found[name] = dims
    return found


@contextlib.contextmanager
def _mapped(fh: Any) -> Iterator[memoryview]:
    """A read-only memory map of open file ``fh`` as a memoryview, unmapped on exit.

    When a walk fails, the exception on its way out still holds slices of the view (in
    its traceback's frames) and the map cannot be closed yet: it is then left to be
    unmapped when they are freed, so the walk's own error is the one raised.
    """
    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        yield view
    finally:
        try:
            view.release()
            mapped.close()
        except BufferError:
            pass


def initializer_dims(
    model_path: Path, names: tuple[str, ...] = POSITION_TABLES
) -> dict[str, list[int]]:
    """Shapes of the top-level initializers called ``names`` (read from the protobuf
    headers through a memory map; raises BundleError if the graph cannot be walked)."""
    found: dict[str, list[int]] = {}
    try:
        with open(model_path, "rb") as fh, _mapped(fh) as view:
            found = _find_dims(view, names)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"bundle graph {model_path.name!r} is not a valid ONNX file: {exc}"
        ) from None
    except OSError as exc:
        raise BundleError(f"bundle graph {model_path.name!r} cannot be read: {exc}") from None
    return found


def external_data_files(model_path: Path) -> list[str]:
    """The external-data file names a graph's tensors point at (raises BundleError if
    the graph cannot be walked)."""
    name = model_path.name
    try:
        with open(model_path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise BundleError(f"bundle graph {name!r} is empty")
            with _mapped(fh) as view:
                names = _locations(view)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle graph {name!r} is not a valid ONNX file: {exc}") from None
    except OSError as exc:
        raise BundleError(f"bundle graph {name!r} cannot be read: {exc}") from None
    return sorted(set(names))


def check_external_data(folder: Path, manifest: Manifest, checksums: dict[str, str]) -> None:
    """Every external-data file the graph names is a plain name listed in ``checksums``."""
    model = manifest.files["model"]
    for name in external_data_files(_inside(folder, model, "bundle model")):
        check_file_name(name, f"graph {model!r} external data")
        if name not in checksums:
            raise BundleError(
                f"graph {model!r} reads external data from {name!r}, which the manifest "
                "does not list with a checksum"
            )
        _inside(folder, name, "external data")


def read_bundle(
    folder: str | Path, verify: bool = True, hashes: FileHashes | None = None
) -> Manifest:
    """Read and validate a bundle's manifest and, if ``verify``, every file's sha256.

    Whatever ``verify``: every file name stays inside the folder, the files of
    ``files`` and the graph's external data are listed in ``checksums``, sizes are
    within :mod:`edge_slm.bundle.limits`, and unlisted files are ignored with a
    :class:`BundleWarning`. ``hashes``: see :func:`verify_checksums`; what it hashed is
    saved once every file matched.
    """
    folder = Path(folder)
    manifest, raw = read_manifest(folder)
    checksums = check_checksums(raw)
    for role, name in manifest.files.items():
        if name not in checksums:
            raise BundleError(f"bundle {role} file {name!r} is not listed in the checksums")
        if not _inside(folder, name, f"bundle {role} file").is_file():
            raise ChecksumError(f"bundle {role} file {name!r} is missing")
    _check_sizes(folder, manifest)
    warn_unlisted(folder, checksums)
    if verify:
        verify_checksums(folder, checksums, hashes)
        if hashes is not None:
            hashes.save()
    check_external_data(folder, manifest, checksums)
    return manifest
