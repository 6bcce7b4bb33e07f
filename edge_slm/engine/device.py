"""Facts about the device a bundle runs on, as typed dataclasses (``edge-slm doctor``).

Each fact is gathered by a small function that reads one source, and the parsing of
text sources is separate from the reading, so it is tested on sample files of other
machines (a Raspberry Pi 4, a Pi 5, an x86 server):

* :func:`parse_cpuinfo` (``/proc/cpuinfo``): CPU model and the features onnxruntime's
  kernels use: NEON (``asimd``), dot product (``asimddp``), int8 matrix multiply
  (``i8mm``) on ARM; AVX2, FMA, AVX-512, VNNI on x86.
* :func:`parse_meminfo` (``/proc/meminfo``): memory and swap.
* :func:`disk_facts`, :func:`python_facts`, :func:`package_versions`.
* :func:`onnxruntime_check`: imports onnxruntime and runs a tiny graph (a float MatMul
  and an int8 MatMulInteger) in a child process, so an onnxruntime build that crashes
  on this CPU (an illegal instruction) is reported by its exit status instead of
  taking the caller down.
* :func:`memory_bandwidth`: a short copy benchmark, the bound of decode speed.
* :func:`bundle_footprint`: a bundle's size, weight bytes read per decoded token and
  KV-cache bytes per token of context.

Standard library and numpy only; onnxruntime is imported in the child process only.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.bundle import Manifest
from edge_slm.errors import InvalidArgumentError

# CPU features worth knowing, in the order shown: /proc/cpuinfo flag -> display name.
ARM_FEATURES = {
    "asimd": "neon",
    "neon": "neon",  # 32-bit ARM kernels name it so
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
}
X86_FEATURES = {
    "sse4_1": "sse4.1",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "avx_vnni": "avx-vnni",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512-vnni",
    "avx512_bf16": "avx512-bf16",
    "amx_int8": "amx-int8",
}
# ARM "CPU part" ids (implementer 0x41, Arm Ltd.) of the cores found in boards and servers.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}
KV_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class CpuFacts:
    """The processor.

    ``family`` is ``"arm"``, ``"x86"`` or ``"other"``; ``features`` the display names of
    the :data:`ARM_FEATURES` / :data:`X86_FEATURES` present; ``flags`` every flag the
    kernel lists. ``usable_cpus`` is what this process may run on (``sched_getaffinity``:
    a container or ``taskset`` can give fewer than ``logical_cpus``).
    """

    machine: str
    family: str
    model: str
    features: tuple[str, ...]
    flags: tuple[str, ...] = ()
    logical_cpus: int = 0
    usable_cpus: int = 0

    def has(self, feature: str) -> bool:
        """True if the display-named ``feature`` (e.g. ``"dotprod"``, ``"avx2"``) is present."""
        return feature in self.features


@dataclass(frozen=True)
class MemoryFacts:
    """Memory and swap in bytes (``available``: what can be used without swapping)."""

    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int


@dataclass(frozen=True)
class DiskFacts:
    """Free and total bytes of the file system holding ``path``."""

    path: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class PythonFacts:
    """The interpreter, and whether it and the OS are 64-bit."""

    version: str
    implementation: str
    executable: str
    bits: int
    os: str
    os_release: str
    libc: str


@dataclass(frozen=True)
class OnnxRuntimeCheck:
    """Outcome of importing onnxruntime and running a tiny graph in a child process.

    ``exit_status`` is the child's: 0 when it worked; negative when a signal killed it
    (``-4``: illegal instruction, the build uses instructions this CPU lacks);
    positive for a Python error (``error`` holds its last line).
    """

    ok: bool
    exit_status: int
    version: str | None = None
    providers: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class BundleFootprint:
    """What a bundle needs: bytes on disk, weight bytes per token, KV cache per token."""

    path: str
    task: str
    model_type: str
    quantization: str
    size_bytes: int
    weights_bytes: int
    context_length: int
    kv_bytes_per_token: int = 0

    @property
    def kv_bytes_full_context(self) -> int:
        """The KV cache of one conversation at the full context length."""
        return self.kv_bytes_per_token * self.context_length


@dataclass(frozen=True)
class DeviceFacts:
    """Everything :func:`gather` collects about this machine."""

    cpu: CpuFacts
    memory: MemoryFacts | None
    disk: DiskFacts
    python: PythonFacts
    packages: dict[str, str | None] = field(default_factory=dict)


# ------------------------------------------------------------------------ parsing
def _cpu_family(machine: str) -> str:
    machine = machine.lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm"
    if machine in ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"):
        return "x86"
    return "other"


def parse_cpuinfo(text: str, machine: str) -> CpuFacts:
    """CPU facts from the text of ``/proc/cpuinfo`` on a ``machine`` (``uname -m``).

    The first processor's ``Features`` (ARM) or ``flags`` (x86) are used. The model is
    ``model name`` (x86), else the board's ``Model`` line (Raspberry Pi) with the core
    name from ``CPU part``, else ``Hardware``. CPU counts are the ``processor`` entries.
    """
    family = _cpu_family(machine)
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value)  # the first processor's value
    flags = tuple((fields.get("features") or fields.get("flags") or "").split())
    names = ARM_FEATURES if family == "arm" else X86_FEATURES if family == "x86" else {}
    present = set(flags)
    features = tuple(dict.fromkeys(name for flag, name in names.items() if flag in present))
    model = fields.get("model name", "")
    if family == "arm":
        core = ARM_PARTS.get(fields.get("cpu part", "").lower(), "")
        board = fields.get("model", "") or fields.get("hardware", "")
        model = model or ", ".join(part for part in (board, core) if part)
    return CpuFacts(
        machine=machine,
        family=family,
        model=model or "unknown",
        features=features,
        flags=flags,
        logical_cpus=processors,
        usable_cpus=processors,
    )


def parse_meminfo(text: str) -> MemoryFacts:
    """Memory facts from the text of ``/proc/meminfo`` (values in kB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return MemoryFacts(total, available, values.get("SwapTotal", 0), values.get("SwapFree", 0))


# ------------------------------------------------------------------------ reading
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_facts() -> CpuFacts:
    """This machine's CPU (``/proc/cpuinfo`` on Linux; the platform module elsewhere)."""
    machine = platform.machine() or "unknown"
    text = _read("/proc/cpuinfo")
    facts = parse_cpuinfo(text or "", machine)
    logical = facts.logical_cpus or os.cpu_count() or 1
    model = facts.model if facts.model != "unknown" else (platform.processor() or "unknown")
    return CpuFacts(
        machine=facts.machine,
        family=facts.family,
        model=model,
        features=facts.features,
        flags=facts.flags,
        logical_cpus=logical,
        usable_cpus=usable_cpus(),
    )


def memory_facts() -> MemoryFacts | None:
    """This machine's memory (None where ``/proc/meminfo`` does not exist)."""
    text = _read("/proc/meminfo")
    return parse_meminfo(text) if text else None


def disk_facts(path: str | Path = ".") -> DiskFacts:
    """Free space of the file system holding ``path`` (or its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    return DiskFacts(str(where), usage.free, usage.total)


def python_facts() -> PythonFacts:
    """The running interpreter and OS."""
    libc = " ".join(part for part in platform.libc_ver() if part)
    return PythonFacts(
        version=platform.python_version(),
        implementation=platform.python_implementation(),
        executable=sys.executable,
        bits=struct.calcsize("P") * 8,
        os=platform.system(),
        os_release=platform.release(),
        libc=libc,
    )


def package_versions(
    names: tuple[str, ...] = ("numpy", "onnxruntime", "tokenizers"),
) -> dict[str, str | None]:
    """Installed versions of ``names`` (None: not installed), without importing them."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions.get("onnxruntime") is None:  # other builds of it: -gpu, -openvino, ...
        for dist in metadata.distributions():
            dist_name = str(dist.metadata["Name"] or "")
            if dist_name.lower().startswith("onnxruntime") and dist_name.lower() != (
                "onnxruntime-genai"
            ):
                versions["onnxruntime"] = f"{dist.version} ({dist_name})"
                break
    return versions


def gather(disk_path: str | Path = ".") -> DeviceFacts:
    """CPU, memory, disk (of ``disk_path``), Python and package versions: all quick."""
    return DeviceFacts(
        cpu=cpu_facts(),
        memory=memory_facts(),
        disk=disk_facts(disk_path),
        python=python_facts(),
        packages=package_versions(),
    )


# ------------------------------------------------------------------ onnxruntime
# A 292-byte ONNX graph (opset 13): Y = X @ W (float) and Yi = MatMulInteger of X
# dynamically quantized, so both float and int8 kernels run once.
_CHECK_MODEL = (
    "CAcSCGVkZ2Utc2xtOo8CChEKAVgKAVcSAVkiBk1hdE11bAomCgFYEgJYcRICWHMSAlh6IhVEeW5hbWljUXVhbnRp"
    "emVMaW5lYXIKHwoCWHEKAldxCgJYehICWWkiDU1hdE11bEludGVnZXISBmRvY3RvcipLCAQIBBABQgFXSkAAAAAA"
    "AACAPQAAAD4AAEA+AACAPgAAoD4AAMA+AADgPgAAAD8AABA/AAAgPwAAMD8AAEA/AABQPwAAYD8AAHA/KhwIBAgE"
    "EANCAldxShD4+fr7/P3+/wABAgMEBQYHWhMKAVgSDgoMCAESCAoCCAEKAggEYhMKAVkSDgoMCAESCAoCCAEKAggE"
    "YhQKAllpEg4KDAgGEggKAggBCgIIBEIECgAQDQ=="
)
_CHECK_SCRIPT = """
import base64, json, sys
import numpy as np
import onnxruntime as ort
model = base64.b64decode(sys.argv[1])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
y, yi = session.run(None, {"X": np.ones((1, 4), dtype=np.float32)})
if not (np.allclose(y, [[1.5, 1.75, 2.0, 2.25]]) and yi.tolist() == [[-2040, -1020, 0, 1020]]):
    sys.exit("onnxruntime computed wrong values for a 4x4 matrix product")
print(json.dumps({"version": ort.__version__, "providers": ort.get_available_providers()}))
"""


def describe_exit(status: int) -> str:
    """``killed by SIGILL (illegal instruction)`` or ``exit status 1``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        meaning = {
            "SIGILL": "illegal instruction: built for CPU features this CPU lacks",
            "SIGSEGV": "segmentation fault",
            "SIGBUS": "bus error",
            "SIGKILL": "killed, often by the out-of-memory killer",
        }.get(name)
        return f"killed by {name}" + (f" ({meaning})" if meaning else "")
    return f"exit status {status}"


def onnxruntime_check(timeout_s: float = 60.0) -> OnnxRuntimeCheck:
    """Import onnxruntime and run a tiny graph in a child Python process.

    Returns the version and execution providers on success, the exit status (and the
    last line of the child's error output) otherwise.
    """
    start = time.perf_counter()
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHECK_SCRIPT, _CHECK_MODEL],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return OnnxRuntimeCheck(False, -1, error=f"no answer within {timeout_s:.0f} s")
    seconds = time.perf_counter() - start
    if child.returncode == 0:
        try:
            data = json.loads(child.stdout.strip().splitlines()[-1])
            return OnnxRuntimeCheck(
                True, 0, str(data["version"]), tuple(data["providers"]), seconds
            )
        except (ValueError, IndexError, KeyError, TypeError):
            return OnnxRuntimeCheck(False, 0, seconds=seconds, error="unreadable answer")
    lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
    error = lines[-1] if lines else describe_exit(child.returncode)
    return OnnxRuntimeCheck(False, child.returncode, seconds=seconds, error=error)


# -------------------------------------------------------------------- bandwidth
def memory_bandwidth(threads: int = 1, size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best bytes/s moved (read + written) by ``threads`` threads copying large arrays.

    numpy releases the GIL while copying, so threads copy in parallel. The best of
    ``repeats`` rounds is kept: the bound is what the memory system can do. Decoding a
    small model reads every weight once per token, so ``bandwidth / weight bytes`` is
    an upper bound of decode tokens/s.
    """
    if threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
    if repeats < 1:
        raise InvalidArgumentError(f"repeats must be >= 1, got {repeats}")
    chunk = max(1, size_bytes // threads // 8)
    sources = [np.ones(chunk, dtype=np.float64) for _ in range(threads)]
    targets = [np.empty_like(s) for s in sources]
    best = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            begin = time.perf_counter()
            list(pool.map(np.copyto, targets, sources))
            elapsed = time.perf_counter() - begin
            best = max(best, 2 * chunk * 8 * threads / elapsed)
    return best


# ----------------------------------------------------------------------- bundles
def graph_bytes(folder: Path, model_file: str) -> int:
    """Bytes of the graph and its external data: an upper bound of weights read per step."""
    model = folder / model_file
    extra = [p for p in folder.iterdir() if p.name.startswith(model.name) and p != model]
    return model.stat().st_size + sum(p.stat().st_size for p in extra)


def kv_bytes_per_token(manifest: Manifest) -> int:
    """KV-cache bytes one token of context takes: layers x (K, V) x kv heads x head dim x item.

    0 for bundles without a decoder (classifiers, embedders).
    """
    decoder = manifest.decoder
    if decoder is None:
        return 0
    item = KV_ITEM_BYTES.get(decoder.kv_dtype, 4)
    return decoder.num_layers * 2 * decoder.num_kv_heads * decoder.head_dim * item


def bundle_footprint(folder: str | Path, manifest: Manifest) -> BundleFootprint:
    """Sizes of a bundle already read (``edge_slm.bundle.read_bundle``)."""
    folder = Path(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return BundleFootprint(
        path=str(folder),
        task=manifest.task,
        model_type=manifest.model_type,
        quantization=manifest.quantization.method,
        size_bytes=size,
        weights_bytes=graph_bytes(folder, manifest.files["model"]),
        context_length=manifest.context_length,
        kv_bytes_per_token=kv_bytes_per_token(manifest),
    )


def as_dict(facts: Any) -> Any:
    """JSON-ready form of a facts dataclass (tuples become lists)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(facts) and not isinstance(facts, type):
        data = asdict(facts)
        if isinstance(facts, BundleFootprint):
            data["kv_bytes_full_context"] = facts.kv_bytes_full_context
        return json.loads(json.dumps(data))
    return facts
