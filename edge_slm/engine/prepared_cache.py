"""A prepared-session cache on disk: the second start-up skips graph optimization and
weight pre-packing.

:func:`open_cached` returns an onnxruntime session from the cache, or builds the cache
entry and returns the session that built it. Building saves the optimized graph with
its pre-packed weights (``model.onnx`` + ``model.data``, about 2.3x the model: the
original initializers plus the pre-packed ones); a hit opens that graph with graph
optimizations off and onnxruntime memory-maps the pre-packed weights instead of
packing them again (SmolLM2-135M int4: session 0.13 s instead of 0.27 s; a 90 MB
MiniLM-size encoder: load 0.07 s instead of 0.17 s and peak RSS 126 MiB instead of
196 MiB, so :func:`edge_slm.load` uses it for encoders too). The first load keeps the
session that built the entry: reopening the fresh entry cost 0.15-0.29 s more and did
not lower the peak RSS, which the build had already reached.

Two repairs of what onnxruntime (1.31) saves: it page-aligns only blobs over 1 MiB,
and a smaller pre-packed blob at an odd offset crashed a kernel that loads it with
aligned AVX-512 instructions (the gguf bundle, SIGSEGV), so :func:`align_external_data`
moves every blob that is not 64-byte aligned (onnxruntime's allocator alignment) to an
aligned offset; and after a hit :func:`release_file_pages` unmaps the originals that
onnxruntime only reads while creating the session (-20 MiB peak RSS). One rewrite: the
exact GGUF graphs' block offsets are folded into their pre-packed weights where
:mod:`edge_slm.engine.block_offsets` can verify it (fewer nodes, faster decode; else
the entry keeps the bundle's offset nodes); the first load then returns the session of
the rewritten entry instead of the one that built it.

**Key.** An entry is used only if every field that changes what is saved matches:
the graph's sha256 (from the bundle manifest, which :func:`edge_slm.load` checked with
``verify=True``; not re-hashed here), the onnxruntime version and build, the graph
optimization level, the execution provider, the CPU (``platform.machine()`` plus a hash
of the ``flags``/``Features`` line of ``/proc/cpuinfo``, else ``platform.processor()``:
a graph saved above ORT_ENABLE_EXTENDED may hold optimizations for this CPU only),
whether block offsets may be folded (``EDGE_SLM_BLOCK_OFFSETS``) and this module's
format version. The key is content-derived: the same bundle unpacked to a
new folder hits the same entry. When the caller cannot vouch for the sha256 (a graph
opened directly, ``verify=False``), the model file's resolved path, size and mtime join
the key (a file changed under a stale manifest misses). The entry's folder name is an
HMAC of the key under a random per-cache secret (``.secret``, mode 0600), so an entry
cannot be planted by someone who cannot read that secret. Thread count and spinning do
not change the saved graph (the files were byte-identical with 1 and 2 threads) and are
not in the key.

**Location.** ``cache_dir`` argument, else ``$EDGE_SLM_CACHE_DIR``, else
``$XDG_CACHE_HOME/edge-slm``, else ``~/.cache/edge-slm``; one sub-folder per key.
``EDGE_SLM_CACHE=0`` turns the cache off unless a caller asks for it explicitly. The
folder also holds ``.bundle-files.json``, the signed stat facts and sha256 of the bundle
files :func:`edge_slm.load` verified (:func:`bundle_hashes`), so a verified load of an
unchanged bundle reads none of its files again either.

**Safety.** An entry is built in a temporary folder beside its target, fsynced and
renamed into place, so other processes see a complete entry or none; when two
processes race, the first rename wins and the loser keeps its own session.
``entry.json`` records the key, the size and the sha256 of every cached file with its
stat facts when it was hashed (:mod:`edge_slm.bundle.hash_record`), the bundle paths it
served, and an HMAC of all that under the cache secret. On a hit, a file whose size,
mtime, ctime, inode and device match its signed facts is not read again (any write
changes its ctime); any other file is hashed in full (and its facts are refreshed when
it matches). An entry whose key, HMAC, sizes or sha256 do not match, or whose session
creation raises, is refused with a
:class:`SessionCacheWarning` (when it was tampered with or corrupt), deleted and rebuilt
once from the bundle: what the cache serves is always what was built from the verified
bundle. A graph whose saved data cannot be aligned is recorded as unusable (the entry
keeps only ``entry.json``) and loads without the cache. A location that cannot be
written (read-only, full) gives one :class:`SessionCacheWarning` and the bundle loads
without the cache; nothing here makes a load fail that would have succeeded without
it. Building an entry removes older entries of the same unverified model path, entries
none of whose bundles exists any more, temporary folders left by killed processes, and
then the least recently used entries while the cache holds more than
``EDGE_SLM_CACHE_MAX_BYTES`` (default 8 GiB; the entry just built is always kept).

**Cost.** A hit whose stat facts all match reads no cached file; a fresh entry's
files are hashed once more at the first hit (racy, see hash_record) and then recorded.
``rehash=True`` (``LoadOptions``) or ``EDGE_SLM_REHASH=1`` hashes every file at every
hit, which also catches silent corruption of the storage. Figures in
``docs/reliability.md``. Not protected: someone who can read the cache secret (the same
account, which could as well edit the bundle or edge_slm itself), and root.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_slm.bundle import hash_record
from edge_slm.bundle.hash_record import FileHashes
from edge_slm.engine import block_offsets

CACHE_ENV = "EDGE_SLM_CACHE"
CACHE_DIR_ENV = "EDGE_SLM_CACHE_DIR"
FORMAT_VERSION = 3  # 3: block offsets folded into pre-packed weights
ENTRY_FILE = "entry.json"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.data"
PROVIDER = "CPUExecutionProvider"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0
SECRET_FILE = ".secret"
MAX_BYTES_ENV = "EDGE_SLM_CACHE_MAX_BYTES"
REHASH_ENV = "EDGE_SLM_REHASH"
BUNDLE_RECORD = ".bundle-files.json"
DEFAULT_MAX_BYTES = 8 << 30

CacheSetting = bool | str | Path | None
"""``True``/``False`` turn the cache on/off, a path turns it on in that folder; None
is the default of whoever takes it (:func:`edge_slm.load`: on unless
``EDGE_SLM_CACHE=0``; :func:`edge_slm.session.create_session`: off)."""


class SessionCacheWarning(RuntimeWarning):
    """The prepared-session cache could not be used; the bundle loaded without it."""


@dataclass(frozen=True)
class CachedSession:
    """A session and where it came from.

    Attributes:
        session: the onnxruntime session.
        status: ``"hit"`` (opened from the cache), ``"built"`` (entry written now),
            ``"off"`` (cache disabled) or ``"unavailable"`` (could not read or write
            the cache; see ``detail``).
        detail: a few words for ``edge-slm bench`` and logs.
    """

    session: ort.InferenceSession
    status: str
    detail: str


def env_enabled() -> bool:
    """False when ``EDGE_SLM_CACHE`` is ``0`` (or ``false``/``no``/``off``)."""
    value = os.environ.get(CACHE_ENV, "").strip().lower()
    return value not in ("0", "false", "no", "off")


def default_cache_dir() -> Path:
    """``$EDGE_SLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/edge-slm``, else ``~/.cache/edge-slm``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "edge-slm"


def cpu_identity() -> str:
    """``machine:hash`` of this CPU's feature flags (what saved optimizations may use)."""
    machine = platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    flags = " ".join(value.split())
                    break
    except OSError:
        pass
    if not flags:
        flags = platform.processor()
    return f"{machine}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def _model_files(model_path: Path) -> list[Path]:
    """The graph and the external-data files beside it (names starting with its name)."""
    extra = sorted(
        p for p in model_path.parent.iterdir() if p.name.startswith(model_path.name) and p.is_file()
    )
    return [model_path] + [p for p in extra if p != model_path]


def cache_key(
    model_path: Path,
    model_sha256: str,
    optimization_level: ort.GraphOptimizationLevel,
    verified: bool = False,
) -> dict[str, Any]:
    """Every field that must match for an entry to be used (see the module docstring).

    ``verified``: the caller checked ``model_sha256`` against the files (a load with
    ``verify=True``); the key is then the content alone, else the file's path, size
    and mtime join it.
    """
    build = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
    key: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model_sha256": model_sha256,
        "onnxruntime": ort.__version__,
        "onnxruntime_build": build,
        "optimization_level": str(optimization_level),
        "provider": PROVIDER,
        "cpu": cpu_identity(),
        "block_offsets": block_offsets.enabled(),
    }
    if not verified:
        model_path = model_path.resolve()
        files = {}
        for path in _model_files(model_path):
            stat = path.stat()
            files[path.name] = [stat.st_size, stat.st_mtime_ns]
        key["model_path"] = str(model_path)
        key["model_files"] = files
    return key


def cache_secret(root: Path, create: bool = True) -> bytes | None:
    """The cache's random HMAC secret (``root/.secret``, mode 0600), made on first use.

    None when it cannot be read or made, or when others may read it (group/world bits)
    or it belongs to another user: the cache is then not used.
    """
    path = root / SECRET_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if not create:
                return None
            try:
                root.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # another process made it first: read theirs
            except OSError:
                return None
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            continue
        except OSError:
            return None
        try:
            stat = os.fstat(fd)
            secret = os.read(fd, 64)
        finally:
            os.close(fd)
        if stat.st_mode & 0o077 or (hasattr(os, "getuid") and stat.st_uid != os.getuid()):
            return None
        return secret if len(secret) == 32 else None
    return None


def _mac(secret: bytes, data: Any) -> str:
    return hash_record.sign(secret, data)


def _digest(key: dict[str, Any], secret: bytes) -> str:
    return _mac(secret, key)[:32]


def _warn(message: str) -> None:
    warnings.warn(f"prepared-session cache not used: {message}", SessionCacheWarning, stacklevel=5)


def _warn_refused(message: str) -> None:
    warnings.warn(
        f"prepared-session cache entry refused and rebuilt: {message}",
        SessionCacheWarning,
        stacklevel=5,
    )


def _read_entry(
    entry: Path, key: dict[str, Any], secret: bytes, rehash: bool
) -> tuple[str, dict[str, Any], bool]:
    """("", record, refreshed) if ``entry`` is complete, authentic and intact for
    ``key``, else (why not, {}, False). A cached file whose size, mtime, ctime, inode
    and device match the facts recorded when it was hashed
    (:mod:`edge_slm.bundle.hash_record`) is not read again unless ``rehash``; any other
    is hashed and compared with the recorded sha256.
    The returned record's ``stat`` holds the facts of the files hashed now; ``refreshed``
    says they differ from the stored ones (the caller saves them)."""
    try:
        record = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {ENTRY_FILE} ({exc})", {}, False
    if not isinstance(record, dict) or record.get("key") != key:
        return "key mismatch", {}, False
    body = hash_record.signed_body(secret, record)
    if body is None:
        return f"{ENTRY_FILE} is not signed by this cache's secret (planted or edited)", {}, False
    record = body
    if isinstance(record.get("unusable"), str):
        return "", record, False
    sizes, hashes = record.get("files"), record.get("sha256")
    if not isinstance(sizes, dict) or GRAPH_FILE not in sizes or not isinstance(hashes, dict):
        return "no file list", {}, False
    recorded = record.get("stat")
    facts = dict(recorded) if isinstance(recorded, dict) and not rehash else {}
    for name, size in sizes.items():
        path = entry / name
        try:
            actual = path.lstat()
        except OSError:
            return f"{name} is missing", {}, False
        if not os.path.isfile(path) or os.path.islink(path):
            return f"{name} is not a regular file", {}, False
        if actual.st_size != size:
            return f"{name} has {actual.st_size} bytes, {size} recorded", {}, False
    present = sorted(p.name for p in entry.iterdir() if p.name != ENTRY_FILE)
    if present != sorted(sizes):
        return f"unexpected files in the entry: {sorted(set(present) - set(sizes))}", {}, False
    for name in sizes:
        if hash_record.unchanged(entry / name, facts.get(name)):
            continue  # the stat facts recorded when it was hashed: the same file, unwritten
        try:
            actual_sha, facts[name] = hash_record.hash_file(entry / name)
        except OSError as exc:
            return f"{name} is unreadable ({exc})", {}, False
        if actual_sha != hashes.get(name):
            return f"{name} has sha256 {actual_sha[:16]}..., not the one recorded", {}, False
    fresh = {name: facts.get(name) for name in sizes}
    return "", {**record, "stat": fresh}, fresh != recorded


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def max_bytes() -> int:
    """The cache's size cap: ``EDGE_SLM_CACHE_MAX_BYTES`` (bytes) or 8 GiB."""
    value = os.environ.get(MAX_BYTES_ENV, "").strip()
    try:
        return max(0, int(value)) if value else DEFAULT_MAX_BYTES
    except ValueError:
        return DEFAULT_MAX_BYTES


def _size(folder: Path) -> int:
    total = 0
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            total += path.lstat().st_size
    return total


def _prune(root: Path, key: dict[str, Any], keep: Path) -> None:
    """Drop other entries of the same unverified model path, entries whose bundles all
    vanished, old temporary folders, then the least recently used entries over the cap."""
    now = time.time()
    try:
        children = list(root.iterdir())
    except OSError:
        return
    alive: list[tuple[float, int, Path]] = []
    for child in children:
        if child == keep or not child.is_dir():
            continue
        try:
            if child.name.startswith(_TMP_PREFIX):
                if now - child.stat().st_mtime > _STALE_TMP_S:
                    _remove(child)
                continue
            record = json.loads((child / ENTRY_FILE).read_text(encoding="utf-8"))
            old = record["key"].get("model_path")
            if old is not None and old == key.get("model_path"):
                _remove(child)
                continue
            paths = record.get("bundle_paths") or []
            if paths and not any(os.path.exists(p) for p in paths):
                _remove(child)  # every bundle it served is gone (unpacked elsewhere)
                continue
            alive.append(((child / ENTRY_FILE).stat().st_mtime, _size(child), child))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    cap = max_bytes()
    try:
        total = _size(keep) + sum(size for _, size, _ in alive)
    except OSError:
        return
    for _, size, child in sorted(alive, key=lambda a: a[0]):  # least recently used first
        if total <= cap:
            break
        _remove(child)
        total -= size


def _touch(entry: Path) -> None:
    """Mark an entry as used now (what the size cap evicts last)."""
    with contextlib.suppress(OSError):
        os.utime(entry / ENTRY_FILE)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------- data alignment
# onnxruntime writes external initializers back to back and page-aligns only those
# over 1 MiB, so a small pre-packed blob can start at any byte; mapped from the file it
# reaches kernels that load it with aligned SIMD instructions (vmovaps: a crash seen
# with the gguf bundle, onnxruntime 1.31). Every blob that does not start on a 64-byte
# boundary (what onnxruntime's allocator guarantees) is copied to an aligned offset at
# the end of the data file, and its offset in the graph is rewritten. The graph is read
# with a minimal protobuf wire-format walker (the runtime does not depend on onnx):
# ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto.external_data (13)
# -> StringStringEntryProto key (1) / value (2).

_ALIGN = 64
_LOCATION_ENTRY = b"\x0a\x08location"  # key field of an external-data entry


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(field, wire type, start, payload start, end) of each field of a message."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        payload = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, payload = _varint(buf, pos)
            pos = payload + length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield field, wire, start, payload, pos


def _map_fields(buf: bytes, field: int, fn: Callable[[bytes], bytes]) -> bytes:
    """``buf`` with the payload of every length-delimited ``field`` replaced by ``fn``."""
    out = bytearray()
    for number, wire, start, payload, end in _fields(buf):
        if number == field and wire == 2:
            new = fn(buf[payload:end])
            out += _encode_varint(field << 3 | 2) + _encode_varint(len(new)) + new
        else:
            out += buf[start:end]
    return bytes(out)


def _entry(buf: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wire, _, payload, end in _fields(buf):
        if wire == 2 and number in (1, 2):
            text = buf[payload:end].decode("utf-8")
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def _blobs(key: str, value: str) -> list[tuple[int, int]]:
    """(offset, length) of the blobs an external-data entry points at."""
    if key == "offset":
        return []  # paired with "length" by the caller
    if not key.startswith("prepacked"):
        return []
    parts = value.split("|")  # key|offset;length;checksum[|offset;length;checksum]
    blobs = []
    for part in parts[1:]:
        fields = part.split(";")
        if len(fields) != 3:
            raise ValueError(f"unexpected pre-packed entry {value[:80]!r}")
        blobs.append((int(fields[0]), int(fields[1])))
    return blobs


def _rewrite_tensor(tensor: bytes, visit: Callable[[str, str], str]) -> bytes:
    def entry(buf: bytes) -> bytes:
        key, value = _entry(buf)
        new = visit(key, value).encode("utf-8")
        name = key.encode("utf-8")
        return b"\x0a" + _encode_varint(len(name)) + name + b"\x12" + _encode_varint(len(new)) + new

    return _map_fields(tensor, 13, entry)


def _walk(model: bytes, visit: Callable[[str, str, dict[str, str]], str]) -> tuple[bytes, int]:
    """Rewrite every external-data value of the graph's initializers with ``visit(key,
    value, all entries of that tensor)``; returns the new bytes and the tensor count."""
    count = 0

    def tensor(buf: bytes) -> bytes:
        nonlocal count
        entries: dict[str, str] = {}
        for number, wire, _, payload, end in _fields(buf):
            if number == 13 and wire == 2:
                key, value = _entry(buf[payload:end])
                entries[key] = value
        if not entries:
            return buf
        count += 1
        return _rewrite_tensor(buf, lambda k, v: visit(k, v, entries))

    new = _map_fields(model, 7, lambda graph: _map_fields(graph, 5, tensor))
    return new, count


def align_external_data(folder: Path) -> int:
    """Move every blob of ``folder/model.data`` that is not 64-byte aligned to an
    aligned offset (see above); returns how many moved. Raises ValueError if the graph
    holds external data this walker does not understand."""
    graph_path, data_path = folder / GRAPH_FILE, folder / DATA_FILE
    model = graph_path.read_bytes()
    blobs: set[tuple[int, int]] = set()

    def collect(key: str, value: str, entries: dict[str, str]) -> str:
        if key == "location" and value != DATA_FILE:
            raise ValueError(f"external data in {value!r}, expected {DATA_FILE!r}")
        if key == "offset":
            blobs.add((int(value), int(entries.get("length", "0"))))
        blobs.update(_blobs(key, value))
        return value

    _, tensors = _walk(model, collect)
    if tensors != model.count(_LOCATION_ENTRY):
        raise ValueError("the graph holds external data outside its initializers")
    moved: dict[tuple[int, int], int] = {}
    misaligned = sorted(b for b in blobs if b[0] % _ALIGN)
    if not misaligned:
        return 0
    with open(data_path, "r+b") as data:
        end = data.seek(0, os.SEEK_END)
        for offset, length in misaligned:
            end += -end % _ALIGN
            data.seek(offset)
            chunk = data.read(length)
            if len(chunk) != length:
                raise ValueError(f"blob at {offset} runs past the end of {DATA_FILE}")
            data.seek(end)
            data.write(chunk)
            moved[(offset, length)] = end
            end += length

    def relocate(key: str, value: str, entries: dict[str, str]) -> str:
        if key == "offset":
            blob = (int(value), int(entries.get("length", "0")))
            return str(moved.get(blob, blob[0]))
        if key.startswith("prepacked"):
            head, *parts = value.split("|")
            for i, (offset, length) in enumerate(_blobs(key, value)):
                checksum = parts[i].split(";")[2]
                parts[i] = f"{moved.get((offset, length), offset)};{length};{checksum}"
            return "|".join([head, *parts])
        return value

    new, _ = _walk(model, relocate)
    offsets: list[int] = []

    def verify(key: str, value: str, entries: dict[str, str]) -> str:
        offsets.extend([int(value)] if key == "offset" else [o for o, _ in _blobs(key, value)])
        return value

    _walk(new, verify)
    if any(o % _ALIGN for o in offsets):
        raise ValueError("a blob is still misaligned after relocation")
    graph_path.write_bytes(new)
    return len(moved)


def _build(
    model_path: Path,
    options: Callable[[], ort.SessionOptions],
    root: Path,
    entry: Path,
    key: dict[str, Any],
    secret: bytes,
) -> CachedSession | str:
    """Build ``entry`` and return the session that built it, or why it could not be
    built (the caller then opens the bundle without the cache)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{entry.name}-", dir=root))
    except OSError as exc:
        return f"cannot write to {root} ({exc.strerror or exc})"
    start = time.perf_counter()
    so = options()
    so.optimized_model_filepath = str(tmp / GRAPH_FILE)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", DATA_FILE
    )
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    so.log_severity_level = 3  # the "hardware specific optimizations" notice: keyed by CPU
    try:
        session = ort.InferenceSession(str(model_path), so, providers=[PROVIDER])
    except Exception as exc:  # a full disk, or a model that will not load at all
        _remove(tmp)
        return f"building the entry in {root} failed ({str(exc).strip()[:200]})"
    record: dict[str, Any] = {"key": key, "bundle_paths": [str(model_path.resolve().parent)]}
    try:
        try:
            record["moved_blobs"] = align_external_data(tmp)
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            # Cannot be made safe: remember it, so later loads skip the cache at once.
            for path in tmp.iterdir():
                path.unlink()
            record["unusable"] = f"cannot align the saved graph's data: {exc}"
        if "unusable" not in record:
            folded, patched = block_offsets.fold_block_offsets(
                tmp, lambda path: _open_entry(path, options)
            )
            record["block_offsets"] = folded.detail
            if patched is not None:
                session = patched  # the entry's graph, as a hit opens it
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        if "unusable" not in record and GRAPH_FILE not in sizes:
            raise OSError(f"onnxruntime wrote no {GRAPH_FILE}")
        record["files"] = sizes
        hashed = {name: hash_record.hash_file(tmp / name) for name in sizes}
        record["sha256"] = {name: sha for name, (sha, _) in hashed.items()}
        record["stat"] = {name: facts for name, (_, facts) in hashed.items()}
        record["build_s"] = round(time.perf_counter() - start, 3)
        _write_record(tmp, record, secret)
        for name in [*sizes, ENTRY_FILE]:
            _fsync(tmp / name)  # complete on disk before it becomes visible
        _remove(entry)  # a stale or broken entry of this key (already judged unusable)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
            _remove(tmp)  # another process renamed its entry first: keep that one
    except OSError as exc:
        _remove(tmp)
        _warn(f"cannot write the entry in {root} ({exc.strerror or exc})")
        return CachedSession(session, "unavailable", f"cache not written: {exc}")
    _prune(root, key, entry)
    if "unusable" in record:
        return CachedSession(session, "off", f"prepared-session cache off: {record['unusable']}")
    total = sum(sizes.values())
    detail = f"prepared-session cache built, {total >> 20} MiB; {record['block_offsets']}"
    return CachedSession(session, "built", detail)


def _write_record(folder: Path, record: dict[str, Any], secret: bytes) -> None:
    body = {k: v for k, v in record.items() if k != "mac"}
    signed = {**body, "mac": _mac(secret, body)}
    tmp = folder / f"{ENTRY_FILE}.tmp"
    tmp.write_text(json.dumps(signed, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / ENTRY_FILE)


def _note_path(
    entry: Path, record: dict[str, Any], model_path: Path, secret: bytes, refreshed: bool
) -> None:
    """Add this bundle's folder to the entry's record (entries whose bundles all
    vanished are pruned), save refreshed stat facts, and mark the entry used; best
    effort (a read-only cache)."""
    here = str(model_path.resolve().parent)
    paths = [p for p in record.get("bundle_paths") or [] if isinstance(p, str)]
    if paths[:1] != [here] or refreshed:
        kept = [here, *[p for p in paths if p != here and os.path.exists(p)][:7]]
        try:
            _write_record(entry, {**record, "bundle_paths": kept}, secret)
            return
        except OSError:
            pass
    _touch(entry)


_MADV_DONTNEED = 4  # Linux, every architecture


def release_file_pages(path: Path) -> int:
    """Unmap this process's resident pages of ``path`` (Linux); returns bytes released.

    onnxruntime reads the original scales and the embedding table of a cached graph
    while it creates the session (to match them with their pre-packed copies) and
    hardly touches them afterwards, but the pages stay mapped and count in RSS (about
    20 MiB for SmolLM2-135M int4). Called right after the session is created, before
    any run: a page needed later faults back in from the page cache. Only mappings
    whose every resident page is still a clean file page are released (no private
    copy can be lost). Anything unexpected: nothing is released.
    """
    if not os.path.exists("/proc/self/pagemap"):
        return 0
    try:
        target = str(path.resolve())
        ranges = []
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
        if not ranges:
            return 0
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/pagemap", "rb") as pagemap:
            chunks = []
            for start, end in ranges:
                pagemap.seek(start // page * 8)
                chunks.append(pagemap.read((end - start) // page * 8))
        flags = np.frombuffer(b"".join(chunks), dtype=np.uint64)
        present = (flags >> np.uint64(63)) & np.uint64(1)
        private = present & ((flags >> np.uint64(61)) & np.uint64(1) ^ np.uint64(1))
        firsts = np.cumsum([0] + [len(c) // 8 for c in chunks[:-1]])
        resident = np.add.reduceat(present, firsts)
        written = np.add.reduceat(private, firsts)
        released = 0
        for (start, end), pages, dirty in zip(ranges, resident, written, strict=True):
            if pages and not dirty and madvise(start, end - start, _MADV_DONTNEED) == 0:
                released += int(pages) * page  # a mapping with a private page is kept whole
        return released
    except (OSError, AttributeError, ValueError):
        return 0


def open_cached(
    model_path: Path,
    model_sha256: str,
    options: Callable[[], ort.SessionOptions],
    cache_dir: str | Path | None = None,
    *,
    verified: bool = False,
    rehash: bool = False,
) -> CachedSession:
    """A session of ``model_path`` from the cache, building the entry on a miss.

    Args:
        model_path: the bundle's ``.onnx`` graph.
        model_sha256: its sha256 from the bundle manifest (the caller vouches for it;
            :func:`edge_slm.load` verifies it unless ``verify=False``).
        options: makes fresh SessionOptions (threads, spinning, optimization level);
            anything in them besides threads/spinning must not change the saved graph,
            except the optimization level, which is part of the key.
        cache_dir: the cache folder; None: :func:`default_cache_dir`.
        verified: ``model_sha256`` was checked against the files just now: the key is
            the content alone (see :func:`cache_key`).
        rehash: hash every cached file on a hit, even those whose stat facts match
            their signed record (also ``EDGE_SLM_REHASH=1``).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    level = options().graph_optimization_level
    try:
        key = cache_key(model_path, model_sha256, level, verified)
    except OSError as exc:
        session = _plain(model_path, options)
        _warn(f"cannot stat {model_path} ({exc})")
        return CachedSession(session, "unavailable", str(exc))
    secret = cache_secret(root) if not root.exists() or root.is_dir() else None
    if secret is None:
        session = _plain(model_path, options)
        why = f"no usable secret in {root} (cannot write it, or others may read it)"
        _warn(why)
        return CachedSession(session, "unavailable", why)
    entry = root / _digest(key, secret)
    problem = "no entry"
    if entry.is_dir():
        problem, record, refreshed = _read_entry(entry, key, secret, rehash or rehash_forced())
        if not problem and "unusable" in record:
            session = _plain(model_path, options)
            return CachedSession(
                session, "off", f"prepared-session cache off: {record['unusable']}"
            )
        if not problem:
            try:
                session = _open_entry(entry / GRAPH_FILE, options)
                release_file_pages(entry / DATA_FILE)
                _note_path(entry, record, model_path, secret, refreshed)
                return CachedSession(session, "hit", "prepared-session cache hit")
            except Exception as exc:  # a corrupt entry: rebuild it from the bundle
                problem = f"entry did not load ({str(exc).strip()[:120]})"
        if problem != "key mismatch":
            _warn_refused(f"{entry.name}: {problem}")
        _remove(entry)
    built = _build(model_path, options, root, entry, key, secret)
    if isinstance(built, str):
        session = _plain(model_path, options)  # raises as it always did on a bad model
        _warn(built)
        return CachedSession(session, "unavailable", built)
    if problem != "no entry":
        detail = f"{built.detail}; the old entry was unusable: {problem}"
        return CachedSession(built.session, built.status, detail)
    return built


def rehash_forced() -> bool:
    """True when ``EDGE_SLM_REHASH`` is ``1`` (or ``true``/``yes``/``on``): every load
    hashes every file in full, the bundle's and the cache's (silent disk corruption)."""
    return os.environ.get(REHASH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def bundle_hashes(setting: CacheSetting, rehash: bool = False) -> FileHashes | None:
    """The signed record of bundle files hashed before (``.bundle-files.json`` in the
    cache folder, signed with the cache secret) for :func:`edge_slm.bundle.read_bundle`;
    None (hash every file) when the cache is off (``setting`` False, or None with
    ``EDGE_SLM_CACHE=0``), has no usable secret, or ``rehash`` is asked."""
    if setting is None:
        setting = env_enabled()
    if setting is False or rehash or rehash_forced():
        return None
    root = default_cache_dir() if setting is True else Path(setting)
    secret = cache_secret(root) if not root.exists() or root.is_dir() else None
    return FileHashes(root / BUNDLE_RECORD, secret) if secret is not None else None


def _open_entry(graph: Path, options: Callable[[], ort.SessionOptions]) -> ort.InferenceSession:
    """An entry's saved graph: optimized already, its pre-packed weights memory-mapped."""
    so = options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(graph), so, providers=[PROVIDER])


def _plain(model_path: Path, options: Callable[[], ort.SessionOptions]) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path), options(), providers=[PROVIDER])
