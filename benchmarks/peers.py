"""Set up the benchmarks' peers: torch's HF folder, onnxruntime-genai and llama.cpp.

Usage (from the repository root, build extras installed; ``make bench`` and
``make bench-server`` run what they need for you):

    .venv/bin/python benchmarks/peers.py [--rebuild] [--only genai|llama]

Five things, each built once and reused while its stamp matches:

1. ``bundles/smollm2-hf``: the GGUF de-quantized by transformers (the torch rows' model
   and the source of genai's builder), built with this checkout's ``edge_slm_export.source``.
2. ``.cache/peers/genai-venv``: a virtual environment holding onnxruntime-genai 0.18 and
   the transformers 5 its model builder needs (this project's build stage pins
   transformers 4.57, so the two cannot share a venv). torch is installed first and pinned
   (these machines carry the 2.13.0 CPU wheel; an unpinned torch pulls CUDA). Its stamp
   file holds the pinned list: change ``GENAI_PINS`` and the venv is rebuilt.
3. ``.cache/peers/genai-smollm2-int4``: genai's own int4 model, written by
   ``python -m onnxruntime_genai.models.builder -i bundles/smollm2-hf -o OUT -p int4 -e cpu``
   offline (``HF_HUB_OFFLINE=1``). Its stamp holds the builder command, the venv's pins and
   the sha256 of the HF folder's files.
4. ``.cache/peers/llama-venv``: llama-cpp-python with its OpenAI server
   (``llama-cpp-python[server]``, ``LLAMA_PINS``), compiled from its sdist by pip with
   ``LLAMA_CMAKE_ARGS`` (CPU only, tuned to this machine's CPU like a device build:
   ``GGML_NATIVE`` on ARM, on x86 the ISA extensions /proc/cpuinfo lists but AMX, whose
   kernels die with SIGILL on these VMs; no multimodal library). Its server answers one request at a time: every
   request takes one global lock (``llama_cpp/server/app.py``, ``get_llama_proxy``), and
   by default a new request even interrupts the one streaming (``--interrupt_requests
   False`` turns that off). It is the peer for one client, not for concurrent ones.
5. ``.cache/peers/llama-server/bin/llama-server``: llama.cpp's own server, built with cmake
   from the llama.cpp sources vendored in the same sdist (``.cache/peers/llama-src``), same
   CPU flags, static, no web UI download, no OpenSSL. Its ``-np N`` slots decode
   concurrent requests together in one batch per step (continuous batching, on by
   default): the fair peer for concurrent clients. ``llama_server_command`` starts it.

Only pip talks to the network (PyPI, or the machine's configured indexes). A failure
raises ``PeerError`` naming the step, with pip's or the builder's last lines; run as a
script it prints that and exits 1. genai: about 3-6 minutes the first time (pip: ~1 GB
of wheels, torch included; builder: ~1 minute). llama: two compiles of ggml and llama.cpp,
9-13 CPU-minutes each (10-37 minutes of wall time on 2 cores shared with other work).
A second or two afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = ROOT / "bundles/smollm2-hf"  # the GGUF de-quantized once, for torch and genai
PEERS = ROOT / ".cache/peers"
GENAI_VENV = PEERS / "genai-venv"
GENAI_MODEL = PEERS / "genai-smollm2-int4"
STAMP = ".edge-slm-stamp"
# torch first and alone, pinned: the local CPU wheel; an unpinned torch pulls CUDA
TORCH_PIN = "torch==2.13.0"
# the set that built and ran genai's model by hand (versions from that venv's pip freeze)
GENAI_PINS = (
    "onnxruntime-genai==0.18.0",
    "onnxruntime==1.31.1",
    "transformers==5.23.0",
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    "onnx-ir==1.1.0",
    "numpy==2.4.6",
    "tokenizers==0.23.3",
    "accelerate==1.15.0",
)
BUILDER = ("-m", "onnxruntime_genai.models.builder", "-p", "int4", "-e", "cpu")
# genai 0.18's Gemma 3 builder reads the transformers 4 config attributes (`rope_theta`,
# `rope_local_base_freq`, a flat `rope_parameters`), which transformers 5 replaced by one
# `rope_parameters` entry per layer type: without them it fails (KeyError 'rope_type') or
# would silently build the global layers with theta 10,000. This shim, run in genai's
# venv instead of `-m ...builder`, puts the old attributes back from the config's own
# values for the builder's own reads (transformers loading the weights keeps its config)
# and then runs the builder unchanged.
GEMMA3_BUILDER_SHIM = r"""
import runpy, sys
import transformers
load = transformers.AutoConfig.from_pretrained
def from_pretrained(*args, **kwargs):
    config = load(*args, **kwargs)
    if isinstance(config, tuple):  # transformers loading the weights: its own config
        return config
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type == "gemma3_text" and "full_attention" in rope:
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    return config
transformers.AutoConfig.from_pretrained = from_pretrained
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""
LLAMA_VERSION = "0.3.36"  # llama-cpp-python; its sdist vendors the llama.cpp we build
LLAMA_VENV = PEERS / "llama-venv"
LLAMA_SRC = PEERS / "llama-src"  # the sdist, unpacked: vendor/llama.cpp for llama-server
LLAMA_SERVER = PEERS / "llama-server"  # cmake build folder; the binaries in bin/
LLAMA_TARGETS = ("llama-server", "llama-bench")
# the server extra's packages as resolved when this was set up (pip freeze of llama-venv)
LLAMA_PINS = (
    f"llama-cpp-python[server]=={LLAMA_VERSION}",
    "numpy==2.4.6",
    "jinja2==3.1.6",
    "diskcache==5.6.3",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "pydantic==2.14.4",
    "pydantic-settings==2.16.3",
    "sse-starlette==3.7.0",
    "starlette-context==0.3.6",
    "PyYAML==6.0.4",
)
# x86 ISA extensions from /proc/cpuinfo -> ggml's switches (GGML_NATIVE=OFF on x86): like
# -march=native, but AMX stays off. With -march=native ggml builds its AMX kernels, and on
# this kind of VM (amx_tile/amx_int8 in cpuinfo) they die at the first `tileloadd` with
# SIGILL (kernel log: "trap invalid opcode ... in libggml-cpu.so"), after "amx repack
# tensor" at load: the server closes the stream without a word.
X86_FEATURES = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}


def _cpu_args() -> tuple[str, ...]:
    """ggml's CPU switches for this machine: -march=native (GGML_NATIVE) except on x86,
    where the features are listed one by one from /proc/cpuinfo and AMX is left out."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ("-DGGML_NATIVE=ON",)
    try:
        flags_line = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )  # fmt: skip
    except (OSError, StopIteration):
        return ("-DGGML_NATIVE=ON",)
    have = set(flags_line.split(":", 1)[1].split())
    return (
        "-DGGML_NATIVE=OFF",
        *(
            f"-D{name}={'ON' if set(needs) <= have else 'OFF'}"
            for name, needs in X86_FEATURES.items()
        ),
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    )


# CPU only, tuned to the build machine as a device would build it (see _cpu_args);
# everything not needed to serve a GGUF is off, so nothing is fetched at build time
LLAMA_CPU_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    *_cpu_args(),
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
LLAMA_CMAKE_ARGS = (*LLAMA_CPU_ARGS, "-DLLAVA_BUILD=OFF")  # pip's build (CMAKE_ARGS)
LLAMA_SERVER_ARGS = (
    *LLAMA_CPU_ARGS,
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ON downloads the web UI from Hugging Face
    "-DLLAMA_OPENSSL=OFF",
)
TAIL = 25  # lines of a failed command's output quoted in the error


class PeerError(RuntimeError):
    """A peer could not be set up; the message names the step and quotes its output."""


@dataclass(frozen=True)
class LlamaPeer:
    """Where the llama.cpp peers live: llama-cpp-python's python and llama-server."""

    python: Path | None
    server: Path | None


@dataclass(frozen=True)
class GenaiPeer:
    """Where the genai peer lives: the venv's python and the builder's model folder."""

    python: Path
    model: Path


def _run(
    step: str, command: list[str], env: dict[str, str] | None = None, cwd: Path = PEERS
) -> None:
    """Run ``command``; on failure raise ``PeerError`` with its last output lines."""
    print(f"[peers] {step}", file=sys.stderr, flush=True)
    PEERS.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    except OSError as error:
        raise PeerError(f"{step}: cannot run {command[0]}: {error}") from error
    if out.returncode != 0:
        lines = (out.stdout + "\n" + out.stderr).strip().splitlines()[-TAIL:]
        raise PeerError(
            f"{step} failed (exit {out.returncode}): {' '.join(command)}\n" + "\n".join(lines)
        )


def _stamp_matches(folder: Path, text: str) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8") == text


def _files_sha256(folder: Path) -> str:
    """One sha256 over the names and contents of a folder's files (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def ensure_hf_dir(hf_dir: Path = HF_DIR, gguf: Path = GGUF) -> Path:
    """The GGUF de-quantized to an HF folder (transformers' loader), once."""
    if (hf_dir / "config.json").is_file():
        return hf_dir
    if not gguf.is_file():
        raise PeerError(f"missing {gguf}: run `make demo` or examples/fetch_assets.py first")
    print(f"[peers] de-quantizing {gguf.name} into {hf_dir}", file=sys.stderr, flush=True)
    from edge_slm_export.source import load_source  # build stage: torch + transformers 4.57

    tmp = hf_dir.parent / (hf_dir.name + "-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(hf_dir, ignore_errors=True)
    load_source(str(gguf), tmp)
    shutil.move(str(tmp / "hf"), hf_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return hf_dir


def ensure_genai_venv(venv: Path = GENAI_VENV, rebuild: bool = False) -> Path:
    """The genai venv (created and filled by pip when its stamp differs); its python."""
    pins = "\n".join((TORCH_PIN, *GENAI_PINS)) + "\n"
    python = venv / "bin/python"
    if not rebuild and python.is_file() and _stamp_matches(venv, pins):
        return python
    PEERS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(venv, ignore_errors=True)
    # from inside a venv, ``-m venv`` bases the new one on the same base interpreter
    _run(f"creating {venv}", [sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(f"pip install {TORCH_PIN} (genai venv)", [*pip, TORCH_PIN])
    _run("pip install onnxruntime-genai and its builder's packages", [*pip, *GENAI_PINS])
    check = (
        "import onnxruntime_genai, onnxruntime, transformers, torch; "
        "assert torch.__version__.startswith('2.13.0'), torch.__version__; "
        "assert transformers.__version__.startswith('5.'), transformers.__version__"
    )
    _run("checking the genai venv's imports", [str(python), "-c", check])
    (venv / STAMP).write_text(pins, encoding="utf-8")
    return python


def ensure_genai_model(
    python: Path, hf_dir: Path = HF_DIR, out: Path = GENAI_MODEL, rebuild: bool = False
) -> Path:
    """genai's int4 model of ``hf_dir``, written by its builder (offline) when stale."""
    pins = (python.parent.parent / STAMP).read_text(encoding="utf-8")
    model_type = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    builder = ("-c", GEMMA3_BUILDER_SHIM, *BUILDER[2:]) if model_type == "gemma3_text" else BUILDER
    command = [str(python), *builder, "-i", str(hf_dir), "-o", "OUT"]
    expected = f"{' '.join(command)}\n{pins}source sha256 {_files_sha256(hf_dir)}\n"
    if not rebuild and (out / "genai_config.json").is_file() and _stamp_matches(out, expected):
        return out
    tmp = out.parent / (out.name + "-tmp")
    cache = out.parent / "genai-builder-cache"
    for folder in (tmp, cache):
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of this checkout's venv in genai's
    build = [*command[:-1], str(tmp), "-c", str(cache)]
    _run(f"building genai's int4 model from {hf_dir}", build, env=env)
    if not (tmp / "genai_config.json").is_file() or not (tmp / "model.onnx").is_file():
        raise PeerError(f"genai's builder wrote no genai_config.json/model.onnx in {tmp}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(cache, ignore_errors=True)
    (out / STAMP).write_text(expected, encoding="utf-8")
    return out


def ensure_genai(rebuild: bool = False) -> GenaiPeer:
    """Everything the genai row needs: HF folder, venv, int4 model."""
    hf_dir = ensure_hf_dir()
    python = ensure_genai_venv(rebuild=rebuild)
    return GenaiPeer(python=python, model=ensure_genai_model(python, hf_dir, rebuild=rebuild))


def genai_paths_or_report() -> tuple[str, str] | None:
    """(python, model folder) of the genai peer, set up by :func:`ensure_genai`; None
    after printing why when the set-up failed (the benchmarks then exit 1)."""
    try:
        peer = ensure_genai()
    except PeerError as error:
        print(f"setting up onnxruntime-genai failed: {error}", file=sys.stderr)
        return None
    return str(peer.python), str(peer.model)


def _build_env() -> dict[str, str]:
    """The compiler's environment: both cores (cmake and pip's scikit-build read it)."""
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    env.pop("PYTHONPATH", None)  # nothing of this checkout's venv in the peers'
    return env


def ensure_llama_venv(venv: Path = LLAMA_VENV, rebuild: bool = False) -> Path:
    """llama-cpp-python's venv (pip compiles it from the sdist when the stamp differs)."""
    stamp = "\n".join((*LLAMA_PINS, "CMAKE_ARGS=" + " ".join(LLAMA_CMAKE_ARGS))) + "\n"
    python = venv / "bin/python"
    if not rebuild and python.is_file() and _stamp_matches(venv, stamp):
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run(f"creating {venv}", [sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    env = {**_build_env(), "CMAKE_ARGS": " ".join(LLAMA_CMAKE_ARGS)}
    _run(
        f"pip install llama-cpp-python[server]=={LLAMA_VERSION} (compiles llama.cpp: minutes)",
        # --no-cache-dir: pip's wheel cache would hand back a wheel built with other flags
        [*pip, "--no-cache-dir", "--no-binary", "llama-cpp-python", *LLAMA_PINS],
        env=env,
    )
    check = (
        "import llama_cpp, llama_cpp.server.app; "
        f"assert llama_cpp.__version__ == {LLAMA_VERSION!r}, llama_cpp.__version__"
    )
    _run("checking the llama venv's imports", [str(python), "-c", check])
    (venv / STAMP).write_text(stamp, encoding="utf-8")
    return python


def ensure_llama_source(src: Path = LLAMA_SRC) -> Path:
    """The llama-cpp-python sdist unpacked (pip download; no build); its llama.cpp folder."""
    tree = src / f"llama_cpp_python-{LLAMA_VERSION}"
    vendored = tree / "vendor/llama.cpp"
    if (vendored / "CMakeLists.txt").is_file():
        return vendored
    src.mkdir(parents=True, exist_ok=True)
    download = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
        "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_VERSION}",
        "-d", str(src),
    ]  # fmt: skip
    _run(f"pip download llama-cpp-python=={LLAMA_VERSION} (sdist)", download)
    sdist = src / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.unpack_archive(sdist, src, filter="data")
    if not (vendored / "CMakeLists.txt").is_file():
        raise PeerError(f"{sdist.name} holds no vendor/llama.cpp/CMakeLists.txt")
    return vendored


def ensure_llama_server(build: Path = LLAMA_SERVER, rebuild: bool = False) -> Path:
    """llama.cpp's ``llama-server`` and ``llama-bench`` (its own decode benchmark), built
    by cmake from the sdist's sources when stale; returns the server's path (the bench
    sits beside it: :func:`llama_bench_binary`)."""
    stamp = (
        f"llama.cpp of llama-cpp-python {LLAMA_VERSION}\n"
        + " ".join(LLAMA_SERVER_ARGS)
        + "\ntargets "
        + " ".join(LLAMA_TARGETS)
    )
    binaries = [build / "bin" / target for target in LLAMA_TARGETS]
    if not rebuild and all(b.is_file() for b in binaries) and _stamp_matches(build, stamp + "\n"):
        return binaries[0]
    source = ensure_llama_source()
    shutil.rmtree(build, ignore_errors=True)
    env = _build_env()
    configure = ["cmake", "-S", str(source), "-B", str(build), *LLAMA_SERVER_ARGS]
    _run("configuring llama.cpp (cmake)", configure, env=env)
    jobs = env["CMAKE_BUILD_PARALLEL_LEVEL"]
    compile_ = ["cmake", "--build", str(build), "--target", *LLAMA_TARGETS, "-j", jobs]
    _run("compiling llama-server and llama-bench (minutes)", compile_, env=env)
    _run("checking llama-server", [str(binaries[0]), "--version"])
    (build / STAMP).write_text(stamp + "\n", encoding="utf-8")
    return binaries[0]


def llama_bench_binary(build: Path = LLAMA_SERVER) -> Path:
    """llama.cpp's ``llama-bench``, built with the server (:func:`ensure_llama_server`)."""
    ensure_llama_server(build)
    return build / "bin/llama-bench"


def ensure_llama(rebuild: bool = False, python: bool = True, server: bool = True) -> LlamaPeer:
    """The llama.cpp peers: llama-cpp-python's venv and/or llama.cpp's llama-server."""
    return LlamaPeer(
        python=ensure_llama_venv(rebuild=rebuild) if python else None,
        server=ensure_llama_server(rebuild=rebuild) if server else None,
    )


def llama_server_command(
    binary: Path, gguf: Path, port: int, threads: int = 2, slots: int = 8, slot_ctx: int = 1024
) -> list[str]:
    """llama.cpp's server on ``gguf``: ``slots`` parallel slots of ``slot_ctx`` tokens each
    (``-c`` is the total, split among the slots), continuous batching, ``threads`` for
    decode and prompt alike, no web UI. Ready when ``/health`` answers 200."""
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(slots),
        "-c", str(slots * slot_ctx), "--cont-batching", "--no-webui",
    ]  # fmt: skip


def llama_python_command(
    python: Path, gguf: Path, port: int, threads: int = 2, ctx: int = 2048
) -> list[str]:
    """llama-cpp-python's OpenAI server on ``gguf``: one request at a time (its global
    lock), without interrupting the streaming request when the next arrives. It has no
    ``/health``: ready when ``/v1/models`` answers."""
    return [
        str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", str(ctx), "--interrupt_requests", "False",
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the venvs and builds")
    parser.add_argument(
        "--only",
        choices=("genai", "llama", "llama-server", "llama-python"),
        help="set up one peer: genai (with torch's HF folder), llama (both llama.cpp "
        "servers) or one of them (default: all)",
    )
    args = parser.parse_args()
    want = {args.only} if args.only else {"genai", "llama"}
    if "llama" in want:
        want |= {"llama-server", "llama-python"}
    try:
        if "genai" in want:
            peer = ensure_genai(rebuild=args.rebuild)
            print(f"torch HF folder: {HF_DIR}\ngenai python:    {peer.python}")
            print(f"genai model:     {peer.model}")
        if want & {"llama-server", "llama-python"}:
            llama = ensure_llama(
                args.rebuild, python="llama-python" in want, server="llama-server" in want
            )
            if llama.server:
                print(f"llama-server:    {llama.server}")
            if llama.python:
                print(f"llama python:    {llama.python} (-m llama_cpp.server)")
    except PeerError as error:
        print(f"peers: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
