"""Set up the benchmark's peers: torch's HF folder and onnxruntime-genai in its own venv.

Usage (from the repository root, build extras installed; ``make bench`` runs it for you):

    .venv/bin/python benchmarks/peers.py [--rebuild]

Three things, each built once and reused while its stamp matches:

1. ``bundles/smollm2-hf``: the GGUF de-quantized by transformers (the torch rows' model
   and the source of genai's builder), built with this checkout's ``export.source``.
2. ``.cache/peers/genai-venv``: a virtual environment holding onnxruntime-genai 0.18 and
   the transformers 5 its model builder needs (this project's build stage pins
   transformers 4.57, so the two cannot share a venv). torch is installed first and pinned
   (these machines carry the 2.13.0 CPU wheel; an unpinned torch pulls CUDA). Its stamp
   file holds the pinned list: change ``GENAI_PINS`` and the venv is rebuilt.
3. ``.cache/peers/genai-smollm2-int4``: genai's own int4 model, written by
   ``python -m onnxruntime_genai.models.builder -i bundles/smollm2-hf -o OUT -p int4 -e cpu``
   offline (``HF_HUB_OFFLINE=1``). Its stamp holds the builder command, the venv's pins and
   the sha256 of the HF folder's files.

Only pip talks to the network (PyPI, or the machine's configured indexes). A failure
raises ``PeerError`` naming the step, with pip's or the builder's last lines; run as a
script it prints that and exits 1. About 3-6 minutes the first time (pip: ~1 GB of
wheels, torch included; builder: ~1 minute), a second or two afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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
TAIL = 25  # lines of a failed command's output quoted in the error


class PeerError(RuntimeError):
    """A peer could not be set up; the message names the step and quotes its output."""


@dataclass(frozen=True)
class GenaiPeer:
    """Where the genai peer lives: the venv's python and the builder's model folder."""

    python: Path
    model: Path


def _run(step: str, command: list[str], env: dict[str, str] | None = None) -> None:
    """Run ``command``; on failure raise ``PeerError`` with its last output lines."""
    print(f"[peers] {step}", file=sys.stderr, flush=True)
    PEERS.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=PEERS, check=False
        )
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
    from export.source import load_source  # build stage: torch + transformers 4.57

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
    command = [str(python), *BUILDER, "-i", str(hf_dir), "-o", "OUT"]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the venv and model")
    args = parser.parse_args()
    try:
        peer = ensure_genai(rebuild=args.rebuild)
    except PeerError as error:
        print(f"peers: {error}", file=sys.stderr)
        return 1
    print(
        f"torch HF folder: {HF_DIR}\ngenai python:    {peer.python}\ngenai model:     {peer.model}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
