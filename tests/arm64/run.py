"""`make test-arm64`: the runtime in an emulated arm64 Debian bookworm, compared with x86.

On the host (this script, with the build stage in .venv):

1. build the test bundles with the build stage: tiny random llama (fused graph) and gpt2
   (optimum's graph) decoders, fp32 and 4-bit (int4-rtn, int4-search), a tiny classifier
   and embedder, a corrupt copy and one from a future format version; and the demo's
   smallest 4-bit SmolLM2 bundle (bundles/smollm2-135m-instruct-int4-small) if missing;
2. run tests/arm64/check_device.py with the x86 runtime: the expected outputs;
3. build or reuse the arm64 root file system (tests/arm64/rootfs.sh, .cache/arm64/rootfs),
   install the project's wheel (`pip wheel . --no-deps`) and numpy, onnxruntime and
   tokenizers as aarch64 wheels from the host side (the host's versions), nothing else;
4. run check_device.py inside it (chroot, QEMU_CPU=cortex-a72, /proc with a Raspberry
   Pi 4 /proc/cpuinfo bound over it, no /sys: onnxruntime crashes under QEMU when it sees
   the x86 host's);
5. compare the two runs (tolerances: see compare()).

Needs root (chroot, mount). Run from the repository root: `.venv/bin/python tests/arm64/run.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SMOLLM2 = "smollm2-135m-instruct-int4-small"
AARCH64_TAGS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")

# Log-probability tolerances (absolute, natural log) between the x86 and the emulated
# arm64 runs, and why:
# - fp32: MLAS's SGEMM kernels (AVX2/AVX-512 on x86, NEON on ARM) sum in a different
#   order, so results agree to float32 rounding (measured: at most 1e-5). Token ids exact.
# - 4-bit: MatMulNBits (accuracy_level 4) quantizes activations to int8 and picks its
#   kernel by CPU features (AVX2 or AVX-512 on x86; NEON without the dot-product
#   instructions on the emulated Cortex-A72, as on a Pi 4: onnxruntime cannot read /sys
#   in the emulator and says so), and the kernels round differently. Measured: up to
#   0.035 on SmolLM2 (tolerance 0.1), up to 0.19 on the tiny random models, whose
#   weights (initializer_range 0.3) give far larger activations than a trained model's
#   (tolerance 0.25; 4-bit quantization itself moves their first token's log-probability
#   by 0.3). Greedy tokens must agree until a step where the host's two best tokens are
#   within 2 x the tolerance (a near tie either kernel may break), and nothing after such a
#   step is compared. A seeded draw on a 4-bit graph may land on another token once the
#   probabilities move (the fp32 rows prove the sampler and its random numbers identical):
#   compared until it does.
FP32_TOL = 1e-3
TINY_INT4_TOL = 0.25
INT4_TOL = 0.1
ENCODER_TOL = 1e-4  # classifier probabilities and embedding components (fp32 graphs)


def say(message: str) -> None:
    print(f"test-arm64: {message}", flush=True)


# ---------------------------------------------------------------- 1. the bundles
def build_bundles(out: Path) -> None:
    """The tiny test bundles (rebuilt each run: seconds, and always the current code)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_encoders import build_classifier, build_sentence_transformer
    from tiny_models import build_model

    from edge_slm_export.decoder import ExportOptions, export_decoder
    from edge_slm_export.encoder import export_encoder
    from edge_slm_quantize.bundle import quantize_bundle

    shutil.rmtree(out, ignore_errors=True)
    src = out.parent / "hf"
    shutil.rmtree(src, ignore_errors=True)
    llama = build_model("llama", src / "llama")
    gpt2 = build_model("gpt2", src / "gpt2")
    export_decoder(str(llama), out / "fused-fp32", ExportOptions(graph="fused"))
    export_decoder(str(gpt2), out / "optimum-fp32", ExportOptions(graph="optimum"))
    quantize_bundle(out / "fused-fp32", out / "fused-int4", "int4-rtn")
    quantize_bundle(out / "optimum-fp32", out / "optimum-int4", "int4-search")
    export_encoder(str(build_classifier("bert", src / "classifier", seed=1)), out / "classifier")
    export_encoder(str(build_sentence_transformer(src / "embedder")), out / "embedder")
    # Refusals: a flipped byte in tokenizer.json; a manifest from a future format version.
    shutil.copytree(out / "fused-fp32", out / "corrupt")
    tokenizer = out / "corrupt" / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[len(data) // 2] ^= 1
    tokenizer.write_bytes(bytes(data))
    shutil.copytree(out / "fused-fp32", out / "future")
    manifest = json.loads((out / "future" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "future" / "manifest.json").write_text(json.dumps(manifest, indent=2))


def smollm2_bundle(bundles: Path, assets: Path) -> Path:
    """The demo's smallest 4-bit bundle, exported and quantized as examples/demo.py does."""
    from edge_slm.bundle import read_bundle
    from edge_slm.errors import BundleError

    target = bundles / SMOLLM2
    try:
        read_bundle(target)
        return target
    except BundleError:
        pass
    sys.path.insert(0, str(REPO / "examples"))
    from demo import VARIANTS

    from edge_slm.cli.progress import stderr_reporter
    from edge_slm_export import ExportOptions, export_decoder
    from edge_slm_quantize.bundle import quantize_bundle

    say(f"building {target} (examples/demo.py's {VARIANTS['int4-small']} variant)")
    fp32 = bundles / "smollm2-135m-instruct"
    try:
        read_bundle(fp32)
    except BundleError:
        gguf = assets / "SmolLM2-135M-Instruct.Q4_1.gguf"
        export_decoder(str(gguf), fp32, ExportOptions(overwrite=True), report=stderr_reporter)
    text = assets / "war-of-the-worlds.txt"
    quantize_bundle(
        fp32,
        target,
        VARIANTS["int4-small"],
        eval_text=text if text.is_file() else None,
        overwrite=True,
        report=stderr_reporter,
    )
    return target


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where possible (bundles are read-only here)."""

    def link(a: str, b: str) -> object:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (torch's export warnings) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# ---------------------------------------------------------------- 3. the device
def install(rootfs: Path, work: Path) -> None:
    """The project's wheel and its three runtime dependencies (aarch64, host's versions)."""
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pip = [sys.executable, "-m", "pip"]
    log = work / "pip.log"
    with log.open("w") as out:
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
             str(REPO)],
            check=True, stdout=out, stderr=out,
        )  # fmt: skip
    (wheel,) = wheels.glob("edge_slm-*.whl")
    site = rootfs / "opt" / "edge-slm" / "site"
    shutil.rmtree(site, ignore_errors=True)
    pins = [f"{name}=={metadata.version(name)}" for name in ("numpy", "onnxruntime", "tokenizers")]
    platforms = [arg for tag in AARCH64_TAGS for arg in ("--platform", tag)]
    # Their own dependencies come along (onnxruntime's protobuf, flatbuffers; tokenizers'
    # huggingface-hub); torch, transformers and the build extra's packages do not.
    with log.open("a") as out:
        done = subprocess.run(
            [*pip, "install", "-q", "--no-warn-conflicts", "--target", str(site), *platforms,
             "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
             str(wheel), *pins],
            stdout=out, stderr=out,
        )  # fmt: skip
    if done.returncode:
        print(log.read_text(), file=sys.stderr)
        raise SystemExit(f"pip failed ({log})")
    # Debian's python3 finds the folder through a .pth file; the console script gets
    # Debian's interpreter (pip wrote the host's).
    dist = rootfs / "usr" / "local" / "lib" / "python3.11" / "dist-packages"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "edge-slm-test.pth").write_text("/opt/edge-slm/site\n")
    script = (site / "bin" / "edge-slm").read_text().split("\n", 1)[1]
    command = rootfs / "usr" / "local" / "bin" / "edge-slm"
    command.write_text("#!/usr/bin/python3\n" + script)
    command.chmod(0o755)
    installed = sorted(p.name.split("-")[0] for p in site.glob("*.dist-info"))
    say(f"installed into the rootfs: {', '.join(installed)}")


def run_device(rootfs: Path, args: list[str]) -> None:
    """check_device.py inside the rootfs: chroot, Pi 4 CPU and /proc/cpuinfo, no /sys."""
    proc = rootfs / "proc"
    cpuinfo = rootfs / "opt" / "edge-slm" / "cpuinfo"
    shutil.copy(HERE / "cpuinfo-pi4.txt", cpuinfo)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": "cortex-a72",
        "EDGE_SLM_CACHE_DIR": "/var/cache/edge-slm-test",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    shutil.rmtree(rootfs / "var" / "cache" / "edge-slm-test", ignore_errors=True)
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        mounted.append(proc)
        subprocess.run(["mount", "--bind", str(cpuinfo), str(proc / "cpuinfo")], check=True)
        mounted.append(proc / "cpuinfo")
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        command = [chroot, str(rootfs), "/usr/bin/python3", "/opt/edge-slm/check_device.py"]
        subprocess.run([*command, *args], check=True, env=env)
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


# ---------------------------------------------------------------- 5. comparing
class Comparison:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.rows: list[tuple[str, str, str]] = []

    def row(self, what: str, ok: bool, detail: str) -> None:
        self.rows.append((what, "ok" if ok else "FAIL", detail))
        if not ok:
            self.failures.append(f"{what}: {detail}")

    def steps(
        self,
        what: str,
        host: list[Any],
        device: list[Any],
        tol: float,
        exact: bool,
        sampled: bool = False,
    ) -> None:
        """Token ids equal up to a legitimate near tie; log-probabilities within tol."""
        worst = 0.0
        n = min(len(host), len(device))
        for i in range(n):
            h, d = host[i], device[i]
            if h["id"] != d["id"]:
                top = host[i]["top"]
                margin = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
                if sampled and not exact:
                    self.row(
                        what,
                        worst <= tol,
                        f"identical for {i} of {len(host)} tokens, then the draw differs "
                        f"(4-bit: allowed); max |logprob diff| before {worst:.2e} (tol {tol:g})",
                    )
                    return
                tie = not exact and margin <= 2 * tol and d["id"] == top[1][0]
                self.row(
                    what,
                    tie and worst <= tol,
                    f"token {i} of {len(host)} differs ({h['id']} vs {d['id']}); host's top-2 "
                    f"margin {margin:.4f} {'<=' if tie else '>'} {2 * tol:g}; max |logprob "
                    f"diff| before {worst:.2e} (tol {tol:g})",
                )
                return
            worst = max(worst, abs(h["logprob"] - d["logprob"]))
        ok = len(host) == len(device) and worst <= tol
        self.row(
            what,
            ok,
            f"{len(host)} vs {len(device)} tokens identical, max |logprob diff| {worst:.2e} "
            f"(tol {tol:g})",
        )

    def equal(self, what: str, host: Any, device: Any) -> None:
        self.row(what, host == device, "identical" if host == device else f"{host!r} vs {device!r}")

    def close(self, what: str, host: Any, device: Any, tol: float) -> None:
        import numpy as np

        diff = float(np.max(np.abs(np.asarray(host) - np.asarray(device))))
        self.row(what, diff <= tol, f"max |diff| {diff:.2e} (tol {tol:g})")


def compare(host: dict[str, Any], device: dict[str, Any]) -> Comparison:
    c = Comparison()
    c.equal("refusals (ChecksumError, BundleVersionError)", host["refusals"], device["refusals"])
    for name, h in host["decoders"].items():
        d = device["decoders"][name]
        exact = name.endswith("fp32")
        tol = FP32_TOL if exact else TINY_INT4_TOL
        c.steps(f"{name} greedy", h["greedy_steps"], d["greedy_steps"], tol, exact)
        c.steps(f"{name} seeded sampling", h["sampled_steps"], d["sampled_steps"], tol, exact, True)
        if exact or h["greedy_ids"] == d["greedy_ids"]:
            c.equal(
                f"{name} stream + stop {h['stop']!r}",
                [h["streamed"], h["finish_reason"]],
                [d["streamed"], d["finish_reason"]],
            )
        c.equal(f"{name} chat rendering", h["chat_prompt"], d["chat_prompt"])
        c.equal(f"{name} chat prompt ids", h["chat_prompt_ids"], d["chat_prompt_ids"])
        c.steps(f"{name} chat", h["chat_steps"], d["chat_steps"], tol, exact)
    enc_h, enc_d = host["encoders"], device["encoders"]
    c.equal("classifier labels (ranked)", enc_h["labels"], enc_d["labels"])
    c.close("classifier probabilities", enc_h["scores"], enc_d["scores"], ENCODER_TOL)
    c.close("embeddings", enc_h["embeddings"], enc_d["embeddings"], ENCODER_TOL)
    c.equal("edge-slm serve: chat completion", host["server"], device["server"])
    if "doctor" in device:
        doctor = device["doctor"]
        c.row(
            "edge-slm doctor --json (device only)",
            True,
            f"{doctor['cpu']} ({doctor['machine']}); SmolLM2 int4-small needs "
            f"{doctor['memory_needed_bytes'] / 2**20:.0f} MiB at full context; no 32-bit warning",
        )
    if "smollm2" in host:
        h, d = host["smollm2"], device["smollm2"]
        c.steps(f"{SMOLLM2} answer", h["steps"], d["steps"], INT4_TOL, exact=False)
        c.row(f"{SMOLLM2} says Paris", "Paris" in d["answer"], repr(d["answer"]))
    return c


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "arm64")
    parser.add_argument("--bundles", type=Path, default=REPO / "bundles")
    parser.add_argument("--assets", type=Path, default=REPO / ".cache" / "assets")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the real bundle")
    args = parser.parse_args()
    start = time.monotonic()
    work = args.work.resolve()
    rootfs = work / "rootfs"
    host_bundles = work / "bundles"

    log = work / "build.log"
    say(f"building the tiny test bundles with the build stage (x86; log: {log})")
    work.mkdir(parents=True, exist_ok=True)
    with quiet(log):
        build_bundles(host_bundles)
    extra = ["--no-smollm2"] if args.no_smollm2 else []
    if not args.no_smollm2:
        target = smollm2_bundle(args.bundles.resolve(), args.assets.resolve())
        shutil.rmtree(host_bundles / "smollm2", ignore_errors=True)
        link_tree(target, host_bundles / "smollm2")

    say("expected outputs: check_device.py with the x86 runtime")
    expected = work / "expected.json"
    env = {**os.environ, "EDGE_SLM_CACHE_DIR": str(work / "host-cache")}
    check = [sys.executable, str(HERE / "check_device.py"), str(host_bundles), str(expected)]
    subprocess.run([*check, *extra], check=True, env=env)

    subprocess.run(["sh", str(HERE / "rootfs.sh"), str(rootfs)], check=True)
    install(rootfs, work)
    device_dir = rootfs / "opt" / "edge-slm"
    shutil.rmtree(device_dir / "bundles", ignore_errors=True)
    link_tree(host_bundles, device_dir / "bundles")
    shutil.copy(HERE / "check_device.py", device_dir / "check_device.py")
    actual = device_dir / "actual.json"
    actual.unlink(missing_ok=True)
    say("emulated arm64 (QEMU cortex-a72, Debian bookworm): check_device.py --device")
    emulated = time.monotonic()
    run_device(rootfs, ["/opt/edge-slm/bundles", "/opt/edge-slm/actual.json", "--device", *extra])
    emulated = time.monotonic() - emulated

    host, device = json.loads(expected.read_text()), json.loads(actual.read_text())
    say(
        f"device: {device['machine']}, Python {device['python']}, numpy {device['numpy']}, "
        f"onnxruntime {device['onnxruntime']}, tokenizers {device['tokenizers']}; build-stage "
        f"code in the wheel: {device['build_stage_code_in_wheel']} (never imported; no torch)"
    )
    result = compare(host, device)
    width = max(len(what) for what, _, _ in result.rows)
    for what, status, detail in result.rows:
        print(f"  {status:<4} {what:<{width}}  {detail}")
    if "smollm2" in host:
        say(f"x86 answer:   {host['smollm2']['answer']!r}")
        say(
            f"arm64 answer: {device['smollm2']['answer']!r} "
            f"({device['smollm2']['seconds']:.0f} s emulated)"
        )
    say(f"emulated run {emulated:.0f} s, total {time.monotonic() - start:.0f} s")
    if result.failures:
        say(f"{len(result.failures)} FAILED")
        return 1
    say(f"all {len(result.rows)} comparisons passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
