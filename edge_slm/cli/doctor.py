"""``edge-slm doctor [BUNDLE]``: can this device run a bundle, and how fast?

Gathers the device's facts (:mod:`edge_slm.engine.device`): CPU model and features,
usable cores, memory and swap, free disk, Python and its bitness, the versions of
numpy, onnxruntime and tokenizers, onnxruntime's execution providers (from a child
process that runs a tiny graph, so a build that crashes on this CPU is reported, not
suffered), and a short memory-bandwidth probe. With a bundle: its checksums, size,
the memory it needs with its KV cache at full context, a predicted decode speed
(memory bandwidth / weight bytes read per token: an upper bound) and a short
measured run in a child process. Then warnings for what is known to break.

``--json`` prints one object for scripts, with these keys:

* ``edge_slm_version``: str.
* ``cpu``: ``machine``, ``family`` (arm, x86, other), ``model``, ``features`` (display
  names: neon, fp16, dotprod, i8mm, bf16, sve; sse4.1, avx, avx2, fma, avx-vnni,
  avx512f, avx512bw, avx512-vnni, avx512-bf16, amx-int8), ``flags``, ``logical_cpus``,
  ``usable_cpus``.
* ``memory``: ``total_bytes``, ``available_bytes``, ``swap_total_bytes``,
  ``swap_free_bytes`` (null where /proc/meminfo is missing).
* ``disk``: ``path``, ``free_bytes``, ``total_bytes``.
* ``python``: ``version``, ``implementation``, ``executable``, ``bits``, ``os``,
  ``os_release``, ``libc``.
* ``packages``: name -> version or null.
* ``onnxruntime``: ``ok``, ``exit_status``, ``version``, ``providers``, ``seconds``, ``error``.
* ``bandwidth``: ``bytes_per_s``, ``threads``, ``size_bytes``.
* ``bundle``: null, or ``path``, ``task``, ``model_type``, ``quantization``,
  ``size_bytes``, ``weights_bytes``, ``context_length``, ``kv_bytes_per_token``,
  ``kv_bytes_full_context``, ``checksums_ok``, ``error``, ``memory_needed_bytes``,
  ``fits_in_memory``, ``predicted_decode_tokens_per_s``, ``measured`` (null, or ``ok``,
  ``exit_status``, ``error``, ``load_s``, ``prompt_tokens``, ``new_tokens``,
  ``time_to_first_token_s``, ``decode_tokens_per_s``, ``texts_per_s``,
  ``peak_rss_bytes``).
* ``findings``: a list of ``{"level": "warning" | "note", "message": str}``.

Exit status: 0 without warnings, 1 with at least one warning (notes do not count).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_slm.engine import device
from edge_slm.engine.device import (
    BundleFootprint,
    DeviceFacts,
    OnnxRuntimeCheck,
    describe_exit,
)

MIB = 1 << 20
GIB = 1 << 30
RUNTIME_BYTES = 120 * MIB  # Python, numpy, onnxruntime and tokenizers loaded, no model
WEIGHT_FACTOR = 1.5  # weights in memory / on disk: onnxruntime pre-packs some of them
LOW_MEMORY_BYTES = 512 * MIB
LOW_DISK_BYTES = 1 * GIB
THIRTY_TWO_BIT_MACHINES = ("armv6l", "armv7l", "armv8l", "i386", "i486", "i586", "i686")


@dataclass(frozen=True)
class Finding:
    """Something to act on (``warning``) or to know (``note``)."""

    level: str
    message: str


@dataclass(frozen=True)
class Bandwidth:
    """Result of the memory-bandwidth probe (bytes read + written per second)."""

    bytes_per_s: float
    threads: int
    size_bytes: int


@dataclass(frozen=True)
class MeasuredRun:
    """A short real run of the bundle in a child process."""

    ok: bool
    exit_status: int = 0
    error: str | None = None
    load_s: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    texts_per_s: float | None = None
    peak_rss_bytes: int | None = None


@dataclass(frozen=True)
class BundleCheck:
    """A bundle against this device."""

    footprint: BundleFootprint | None
    checksums_ok: bool
    error: str | None = None
    memory_needed_bytes: int | None = None
    fits_in_memory: bool | None = None
    predicted_decode_tokens_per_s: float | None = None
    measured: MeasuredRun | None = None


@dataclass(frozen=True)
class DoctorReport:
    """Everything ``edge-slm doctor`` found."""

    edge_slm_version: str
    facts: DeviceFacts
    onnxruntime: OnnxRuntimeCheck
    bandwidth: Bandwidth | None
    bundle: BundleCheck | None
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (keys in the module docstring)."""
        bundle: dict[str, Any] | None = None
        if self.bundle is not None:
            b = self.bundle
            bundle = device.as_dict(b.footprint) if b.footprint else {"path": None}
            bundle.update(
                checksums_ok=b.checksums_ok,
                error=b.error,
                memory_needed_bytes=b.memory_needed_bytes,
                fits_in_memory=b.fits_in_memory,
                predicted_decode_tokens_per_s=b.predicted_decode_tokens_per_s,
                measured=asdict(b.measured) if b.measured else None,
            )
        return {
            "edge_slm_version": self.edge_slm_version,
            "cpu": device.as_dict(self.facts.cpu),
            "memory": device.as_dict(self.facts.memory) if self.facts.memory else None,
            "disk": device.as_dict(self.facts.disk),
            "python": device.as_dict(self.facts.python),
            "packages": dict(self.facts.packages),
            "onnxruntime": device.as_dict(self.onnxruntime),
            "bandwidth": asdict(self.bandwidth) if self.bandwidth else None,
            "bundle": bundle,
            "findings": [asdict(f) for f in self.findings],
        }


# ------------------------------------------------------------------ measuring
_STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
    "steps and listening to the sea below, while the ships passed far out in the dark. "
)


def measure_run(bundle: str, new_tokens: int, threads: int | None) -> dict[str, Any]:
    """Load ``bundle`` and run it briefly (greedy, end tokens banned); JSON-ready numbers.

    Runs in the doctor's child process (see :func:`measured_run`).
    """
    from edge_slm import TextClassifier, TextEmbedder, TextGenerator, load
    from edge_slm.cli.bench import peak_rss_bytes

    start = time.perf_counter()
    model = load(bundle, threads=threads, verify=False, cache=False)
    load_s = time.perf_counter() - start
    out: dict[str, Any] = {"load_s": load_s}
    if isinstance(model, TextGenerator):
        context = model.manifest.context_length
        new_tokens = max(1, min(new_tokens, context // 2))
        story = model.encode(_STORY * 4, add_special_tokens=False)
        prompt = story[: max(1, min(32, context - new_tokens - 1))]
        banned = {int(t): float("-inf") for t in model.manifest.special_tokens.eos_token_ids}
        options: dict[str, Any] = {"temperature": 0.0, "logit_bias": banned or None}
        for _ in model.generate_tokens(prompt, max_new_tokens=2, **options):
            pass  # warm-up: onnxruntime allocates its arenas on the first runs
        begin = time.perf_counter()
        first = None
        count = 0
        for _ in model.generate_tokens(prompt, max_new_tokens=new_tokens, **options):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        out.update(
            prompt_tokens=len(prompt),
            new_tokens=count,
            time_to_first_token_s=first - begin,
            decode_tokens_per_s=(count - 1) / (end - first) if count > 1 else None,
        )
    elif isinstance(model, (TextClassifier, TextEmbedder)):
        texts = [_STORY[: 40 + 7 * i] for i in range(8)]
        run = model.classify if isinstance(model, TextClassifier) else model.embed
        run(texts[:1])
        begin = time.perf_counter()
        run(texts)
        out["texts_per_s"] = len(texts) / (time.perf_counter() - begin)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


_MEASURE_SCRIPT = """
import json, sys
from edge_slm.cli.doctor import measure_run
threads = int(sys.argv[3]) if sys.argv[3] != "-" else None
print(json.dumps(measure_run(sys.argv[1], int(sys.argv[2]), threads)))
"""


def measured_run(
    bundle: Path, new_tokens: int, threads: int | None, timeout_s: float = 300.0
) -> MeasuredRun:
    """:func:`measure_run` in a child process: a crash is reported by its exit status."""
    args = [str(bundle), str(new_tokens), str(threads) if threads else "-"]
    try:
        child = subprocess.run(
            [sys.executable, "-c", _MEASURE_SCRIPT, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return MeasuredRun(False, -1, f"no result within {timeout_s:.0f} s")
    if child.returncode != 0:
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        error = describe_exit(child.returncode)
        if child.returncode > 0 and lines:
            error = lines[-1]
        return MeasuredRun(False, child.returncode, error)
    try:
        data = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return MeasuredRun(False, 0, "unreadable result")
    return MeasuredRun(True, 0, None, **data)


# ------------------------------------------------------------------ diagnosis
def memory_needed(footprint: BundleFootprint) -> int:
    """Estimated bytes to run a bundle with one conversation at full context."""
    return int(RUNTIME_BYTES + WEIGHT_FACTOR * footprint.weights_bytes) + (
        footprint.kv_bytes_full_context
    )


def check_bundle(
    path: Path,
    facts: DeviceFacts,
    bandwidth: Bandwidth | None,
    measure: bool,
    new_tokens: int,
    threads: int | None,
) -> BundleCheck:
    """Checksums, footprint, fit, predicted and (if ``measure``) measured speed."""
    from edge_slm.bundle import read_bundle
    from edge_slm.errors import ChecksumError, EdgeSlmError

    checksums_ok = True
    error = None
    try:
        manifest = read_bundle(path, verify=True)
    except ChecksumError as exc:
        checksums_ok, error = False, str(exc)
        try:
            manifest = read_bundle(path, verify=False)
        except EdgeSlmError:
            return BundleCheck(None, False, error)
    except EdgeSlmError as exc:
        return BundleCheck(None, False, str(exc))
    footprint = device.bundle_footprint(path, manifest)
    needed = memory_needed(footprint)
    fits = None if facts.memory is None else needed <= facts.memory.available_bytes
    predicted = None
    if bandwidth is not None and footprint.task == "text-generation" and footprint.weights_bytes:
        predicted = bandwidth.bytes_per_s / footprint.weights_bytes
    measured = None
    if measure and checksums_ok:
        measured = measured_run(path, new_tokens, threads)
    return BundleCheck(footprint, checksums_ok, error, needed, fits, predicted, measured)


def diagnose(
    facts: DeviceFacts, ort: OnnxRuntimeCheck, bundle: BundleCheck | None = None
) -> list[Finding]:
    """What is known to break (warnings) or to be slow (notes) on this device."""
    found: list[Finding] = []

    def warn(message: str) -> None:
        found.append(Finding("warning", message))

    def note(message: str) -> None:
        found.append(Finding("note", message))

    cpu, py = facts.cpu, facts.python
    if py.bits < 64 or cpu.machine.lower() in THIRTY_TWO_BIT_MACHINES:
        warn(
            f"32-bit {'Python' if py.bits < 64 else 'OS'} ({cpu.machine}, {py.bits}-bit "
            "Python): onnxruntime publishes no 32-bit ARM builds and a 32-bit process can "
            "address at most 3-4 GiB; install a 64-bit OS (e.g. Raspberry Pi OS 64-bit)"
        )
    for name, version in facts.packages.items():
        if version is None:
            warn(f"{name} is not installed: pip install edge-slm installs it")
    if not ort.ok and facts.packages.get("onnxruntime") is not None:
        how = describe_exit(ort.exit_status) if ort.exit_status < 0 else (ort.error or "failed")
        warn(f"onnxruntime does not work on this machine: a tiny graph failed ({how})")
    if cpu.family == "arm":
        if not cpu.has("neon") and cpu.flags:
            warn("the CPU reports no NEON (asimd): onnxruntime's ARM kernels need it")
        elif cpu.flags and not cpu.has("dotprod"):
            note(
                "no dot-product instructions (asimddp, as on a Cortex-A72 / Raspberry Pi 4): "
                "int8 and 4-bit matrix products take slower paths than on a Cortex-A76 / Pi 5"
            )
    elif cpu.family == "x86" and cpu.flags:
        if not cpu.has("avx"):
            warn(
                "the CPU has no AVX: some onnxruntime builds stop with an illegal "
                "instruction on it, and the others run slowly"
            )
        elif not cpu.has("avx2"):
            note("no AVX2: onnxruntime's fast int8 and 4-bit kernels need it")
        elif not (cpu.has("avx512-vnni") or cpu.has("avx-vnni")):
            note("no VNNI (avx512_vnni / avx_vnni): int8 matrix products use plain AVX2")
    if cpu.usable_cpus < cpu.logical_cpus:
        note(
            f"this process may use {cpu.usable_cpus} of {cpu.logical_cpus} CPUs "
            "(a container limit or taskset)"
        )
    mem = facts.memory
    if mem is not None and mem.available_bytes < LOW_MEMORY_BYTES:
        warn(
            f"only {mem.available_bytes / MIB:,.0f} MiB of memory available: even small "
            "bundles may not load"
        )
    if facts.disk.free_bytes < LOW_DISK_BYTES:
        warn(
            f"only {facts.disk.free_bytes / MIB:,.0f} MiB free on {facts.disk.path}: the "
            "prepared-session cache and logs need room"
        )
    if bundle is not None:
        found += _bundle_findings(bundle, facts)
    return found


def _bundle_findings(bundle: BundleCheck, facts: DeviceFacts) -> list[Finding]:
    found: list[Finding] = []
    if bundle.error:
        found.append(Finding("warning", f"the bundle is not usable: {bundle.error}"))
    fp, mem = bundle.footprint, facts.memory
    if fp is not None and mem is not None and bundle.memory_needed_bytes is not None:
        needed = bundle.memory_needed_bytes
        if not bundle.fits_in_memory:
            swap = (
                " (it would swap: very slow)"
                if needed <= (mem.available_bytes + mem.swap_free_bytes)
                else ""
            )
            found.append(
                Finding(
                    "warning",
                    f"the bundle needs about {needed / MIB:,.0f} MiB with a full-context KV "
                    f"cache, more than the {mem.available_bytes / MIB:,.0f} MiB available{swap}; "
                    "use a smaller (4-bit) bundle or free memory",
                )
            )
        elif needed > 0.8 * mem.available_bytes:
            found.append(
                Finding(
                    "note",
                    f"the bundle needs about {needed / MIB:,.0f} MiB of the "
                    f"{mem.available_bytes / MIB:,.0f} MiB available: little room for anything else",
                )
            )
    if fp is not None and facts.disk.free_bytes < fp.size_bytes:
        found.append(
            Finding(
                "note",
                "less free disk than the bundle's size: the prepared-session cache "
                "(~/.cache/edge-slm) cannot be written",
            )
        )
    measured = bundle.measured
    if measured is not None and not measured.ok:
        how = describe_exit(measured.exit_status) if measured.exit_status < 0 else measured.error
        found.append(Finding("warning", f"the bundle did not run here: {how}"))
    return found


# -------------------------------------------------------------------- report
def make_report(
    bundle: Path | None = None,
    *,
    quick: bool = False,
    measure: bool = True,
    new_tokens: int = 16,
    threads: int | None = None,
) -> DoctorReport:
    """Gather the facts, probe, check the bundle and diagnose.

    Args:
        bundle: a bundle folder to check against this device, or None.
        quick: a smaller bandwidth probe (16 MiB instead of 64 MiB).
        measure: run the bundle briefly in a child process.
        new_tokens: tokens the measured run decodes.
        threads: CPU threads for the probe and the run (None: every usable CPU).
    """
    from edge_slm import __version__

    disk_path = bundle if bundle is not None else Path.cwd()
    facts = device.gather(disk_path)
    ort = device.onnxruntime_check()
    n_threads = threads or facts.cpu.usable_cpus
    size = (16 if quick else 64) * MIB
    if facts.memory is not None:
        size = max(MIB, min(size, facts.memory.available_bytes // 8))
    bandwidth = Bandwidth(
        device.memory_bandwidth(n_threads, size, repeats=3 if quick else 5), n_threads, size
    )
    checked = None
    if bundle is not None:
        checked = check_bundle(bundle, facts, bandwidth, measure and ort.ok, new_tokens, threads)
    return DoctorReport(__version__, facts, ort, bandwidth, checked, diagnose(facts, ort, checked))


def _size(value: float) -> str:
    if value >= GIB:
        return f"{value / GIB:,.1f} GiB"
    return f"{value / MIB:,.0f} MiB" if value >= 10 * MIB else f"{value / MIB:,.2f} MiB"


def format_report(report: DoctorReport) -> str:
    """The report as aligned lines for people."""
    f = report.facts
    cpu = f.cpu
    rows: list[tuple[str, str]] = [("edge-slm", report.edge_slm_version)]
    rows.append(("cpu", f"{cpu.model} ({cpu.machine})"))
    rows.append(("features", ", ".join(cpu.features) or "none of note"))
    cores = f"{cpu.usable_cpus} usable"
    rows.append(("cores", cores + (f" of {cpu.logical_cpus}" if cpu.logical_cpus else "")))
    if f.memory is not None:
        m = f.memory
        rows.append(("memory", f"{_size(m.available_bytes)} available of {_size(m.total_bytes)}"))
        swap = f"{_size(m.swap_free_bytes)} free of {_size(m.swap_total_bytes)}"
        rows.append(("swap", swap if m.swap_total_bytes else "none"))
    rows.append(("disk", f"{_size(f.disk.free_bytes)} free on {f.disk.path}"))
    py = f.python
    rows.append(
        ("python", f"{py.implementation} {py.version}, {py.bits}-bit, {py.os} {py.os_release}")
    )
    rows.append(("packages", ", ".join(f"{k} {v or 'MISSING'}" for k, v in f.packages.items())))
    ort = report.onnxruntime
    if ort.ok:
        rows.append(("onnxruntime", f"works ({', '.join(ort.providers)})"))
    else:
        rows.append(("onnxruntime", f"FAILED: {ort.error or describe_exit(ort.exit_status)}"))
    if report.bandwidth is not None:
        bw = report.bandwidth
        rows.append(
            (
                "bandwidth",
                f"{bw.bytes_per_s / 1e9:.1f} GB/s ({bw.threads} threads copying "
                f"{_size(bw.size_bytes)})",
            )
        )
    if report.bundle is not None:
        rows += _bundle_rows(report.bundle)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if report.findings:
        lines.append("")
        lines += [f"{finding.level}: {finding.message}" for finding in report.findings]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)


def _bundle_rows(b: BundleCheck) -> list[tuple[str, str]]:
    fp = b.footprint
    if fp is None:
        return [("bundle", f"unusable: {b.error}")]
    rows = [
        ("bundle", f"{fp.path} ({fp.task}, {fp.model_type}, quantization {fp.quantization})"),
        ("size", f"{_size(fp.size_bytes)} on disk, {_size(fp.weights_bytes)} of graph and weights"),
        ("checksums", "ok" if b.checksums_ok else "FAILED"),
    ]
    if fp.kv_bytes_per_token:
        rows.append(
            (
                "KV cache",
                f"{fp.kv_bytes_per_token / 1024:,.1f} KiB per token, "
                f"{_size(fp.kv_bytes_full_context)} at {fp.context_length:,} tokens",
            )
        )
    if b.memory_needed_bytes is not None:
        verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown"}[b.fits_in_memory]
        rows.append(("memory needed", f"about {_size(b.memory_needed_bytes)}: {verdict}"))
    if b.predicted_decode_tokens_per_s is not None:
        bound = f"up to {b.predicted_decode_tokens_per_s:,.1f} tokens/s decoding"
        if fp.weights_bytes < 32 * MIB:  # fits in caches: per-step overhead rules instead
            bound += " (bandwidth bound; a model this small is limited by per-token overhead)"
        rows.append(("predicted", bound))
    m = b.measured
    if m is not None and m.ok:
        if m.decode_tokens_per_s is not None:
            ttft = (m.time_to_first_token_s or 0) * 1000
            rows.append(
                (
                    "measured",
                    f"{m.decode_tokens_per_s:,.1f} tokens/s decoding ({m.new_tokens} tokens), "
                    f"first token {ttft:.0f} ms ({m.prompt_tokens}-token prompt), "
                    f"load {m.load_s:.2f} s",
                )
            )
        elif m.texts_per_s is not None:
            rows.append(("measured", f"{m.texts_per_s:,.1f} texts/s, load {m.load_s:.2f} s"))
        if m.peak_rss_bytes:
            rows.append(("peak memory", _size(m.peak_rss_bytes) + " (measured run)"))
    elif m is not None:
        rows.append(("measured", f"FAILED: {m.error}"))
    return rows


# ----------------------------------------------------------------------- CLI
def add_doctor_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand to an argparse subparsers object."""
    cmd = sub.add_parser(
        "doctor",
        help="check this device (and a bundle): CPU, memory, onnxruntime, speed",
        description="Check this device, and optionally a bundle on it: CPU model and "
        "features, cores, memory, disk, Python, package versions, whether onnxruntime "
        "works here, memory bandwidth; for a bundle its checksums, whether it fits in "
        "memory with a full-context KV cache, and predicted against measured decode "
        "speed. Exit status 1 when there are warnings.",
    )
    cmd.add_argument(
        "bundle", type=Path, nargs="?", metavar="BUNDLE", help="bundle folder to check (optional)"
    )
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.add_argument(
        "--quick", action="store_true", help="a smaller, faster memory-bandwidth probe"
    )
    cmd.add_argument(
        "--no-run", action="store_true", help="do not run the bundle (no measured speed)"
    )
    cmd.add_argument(
        "--tokens",
        type=int,
        default=16,
        metavar="N",
        help="tokens the measured run decodes",
    )
    cmd.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads to use (default: every usable CPU)"
    )
    return cmd  # type: ignore[no-any-return]


def run_doctor(args: argparse.Namespace) -> int:
    """Run ``edge-slm doctor``; 0 without warnings, 1 with."""
    from edge_slm.errors import InvalidArgumentError

    if args.tokens < 1:
        raise InvalidArgumentError(f"--tokens must be >= 1, got {args.tokens}")
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {args.threads}")
    if args.bundle is not None and not args.bundle.is_dir():
        raise InvalidArgumentError(f"bundle folder {str(args.bundle)!r} does not exist")
    report = make_report(
        args.bundle,
        quick=args.quick,
        measure=not args.no_run,
        new_tokens=args.tokens,
        threads=args.threads,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 1 if any(f.level == "warning" for f in report.findings) else 0
