"""``edge-slm doctor``: device facts parsed from other machines' /proc files, and real runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edge_slm.cli.doctor import diagnose, format_report, make_report
from edge_slm.cli.main import main
from edge_slm.engine import device
from edge_slm.engine.device import (
    DeviceFacts,
    DiskFacts,
    MemoryFacts,
    OnnxRuntimeCheck,
    PythonFacts,
    parse_cpuinfo,
    parse_meminfo,
)

_PI_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: {features}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: {variant}
CPU part\t: {part}
CPU revision\t: {revision}

"""
PI4_CPUINFO = "".join(
    _PI_CORE.format(
        n=n, features="fp asimd evtstrm crc32 cpuid", variant="0x0", part="0xd08", revision=3
    )
    for n in range(4)
) + (
    "Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: 10000000a1b2c3d4\n"
    "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)
PI5_CPUINFO = "".join(
    _PI_CORE.format(
        n=n,
        features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
        "asimdrdm lrcpc dcpop asimddp",
        variant="0x4",
        part="0xd0b",
        revision=1,
    )
    for n in range(4)
) + (
    "Revision\t: d04170\nSerial\t\t: 5a8f7c2e1b3d4f60\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
)
X86_CPUINFO = "".join(
    f"""processor\t: {n}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat sse sse2 ss ht \
syscall nx lm constant_tsc pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx \
f16c rdrand hypervisor lahf_lm abm avx2 bmi1 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl \
avx512_vnni avx512_bitalg avx512_vpopcntdq
bogomips\t: 4000.00

"""
    for n in range(8)
)
MEMINFO = """MemTotal:        3884120 kB
MemFree:          911456 kB
MemAvailable:    2985444 kB
Buffers:          112344 kB
Cached:          1892100 kB
SwapTotal:        102396 kB
SwapFree:         102396 kB
"""


def test_raspberry_pi_4() -> None:
    cpu = parse_cpuinfo(PI4_CPUINFO, "aarch64")
    assert cpu.family == "arm"
    assert cpu.model == "Raspberry Pi 4 Model B Rev 1.4, Cortex-A72"
    assert cpu.features == ("neon",)
    assert not cpu.has("dotprod") and not cpu.has("i8mm")
    assert cpu.logical_cpus == 4


def test_raspberry_pi_5() -> None:
    cpu = parse_cpuinfo(PI5_CPUINFO, "aarch64")
    assert cpu.model == "Raspberry Pi 5 Model B Rev 1.0, Cortex-A76"
    assert cpu.features == ("neon", "fp16", "dotprod")
    assert not cpu.has("i8mm")


def test_x86_avx512_vnni() -> None:
    cpu = parse_cpuinfo(X86_CPUINFO, "x86_64")
    assert cpu.family == "x86"
    assert cpu.model == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    for feature in ("avx2", "fma", "avx512f", "avx512bw", "avx512-vnni"):
        assert cpu.has(feature)
    assert not cpu.has("avx-vnni") and not cpu.has("amx-int8")
    assert cpu.logical_cpus == 8


def test_meminfo() -> None:
    mem = parse_meminfo(MEMINFO)
    assert mem == MemoryFacts(3884120 * 1024, 2985444 * 1024, 102396 * 1024, 102396 * 1024)


def _facts(cpuinfo: str, machine: str, bits: int = 64, available: int = 3 << 30) -> DeviceFacts:
    cpu = replace(parse_cpuinfo(cpuinfo, machine), usable_cpus=4)
    return DeviceFacts(
        cpu=cpu,
        memory=MemoryFacts(4 << 30, available, 0, 0),
        disk=DiskFacts("/", 20 << 30, 30 << 30),
        python=PythonFacts("3.11.2", "CPython", "/usr/bin/python3", bits, "Linux", "6.6", ""),
        packages={"numpy": "2.0", "onnxruntime": "1.20.1", "tokenizers": "0.21"},
    )


ORT_OK = OnnxRuntimeCheck(True, 0, "1.20.1", ("CPUExecutionProvider",))


def test_warnings_for_what_breaks() -> None:
    pi4 = diagnose(_facts(PI4_CPUINFO, "aarch64"), ORT_OK)
    assert [f.level for f in pi4] == ["note"] and "asimddp" in pi4[0].message
    assert diagnose(_facts(PI5_CPUINFO, "aarch64"), ORT_OK) == []

    thirty_two = diagnose(_facts(PI4_CPUINFO.replace("asimd", "neon"), "armv7l", bits=32), ORT_OK)
    assert any(f.level == "warning" and "32-bit" in f.message for f in thirty_two)

    crashed = OnnxRuntimeCheck(False, -4, error=None)
    found = diagnose(_facts(PI4_CPUINFO, "aarch64"), crashed)
    assert any("SIGILL" in f.message and "illegal instruction" in f.message for f in found)

    low = diagnose(_facts(X86_CPUINFO, "x86_64", available=300 << 20), ORT_OK)
    assert any(f.level == "warning" and "300 MiB" in f.message for f in low)


def test_kv_bytes_per_token_from_the_manifest(bundles: dict[str, Path]) -> None:
    from edge_slm.bundle import read_bundle

    manifest = read_bundle(bundles["llama"])
    d = manifest.decoder
    assert d is not None
    expected = d.num_layers * 2 * d.num_kv_heads * d.head_dim * 4
    footprint = device.bundle_footprint(bundles["llama"], manifest)
    assert footprint.kv_bytes_per_token == expected
    assert footprint.kv_bytes_full_context == expected * manifest.context_length
    assert footprint.weights_bytes <= footprint.size_bytes


def test_onnxruntime_check_on_this_machine() -> None:
    check = device.onnxruntime_check()
    assert check.ok, check.error
    assert "CPUExecutionProvider" in check.providers
    assert device.describe_exit(-11).startswith("killed by SIGSEGV")


def test_doctor_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--quick"])
    out = capsys.readouterr().out
    assert code in (0, 1)  # 1 only if this machine has warnings
    for label in ("cpu", "features", "memory", "disk", "python", "onnxruntime", "bandwidth"):
        assert f"\n{label} " in f"\n{out}"


JSON_KEYS = {
    "edge_slm_version",
    "cpu",
    "memory",
    "disk",
    "python",
    "packages",
    "onnxruntime",
    "bandwidth",
    "bundle",
    "findings",
}
BUNDLE_KEYS = {
    "path",
    "task",
    "model_type",
    "quantization",
    "size_bytes",
    "weights_bytes",
    "context_length",
    "kv_bytes_per_token",
    "kv_bytes_full_context",
    "checksums_ok",
    "error",
    "memory_needed_bytes",
    "fits_in_memory",
    "predicted_decode_tokens_per_s",
    "measured",
}


def test_doctor_json_on_a_tiny_bundle(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["doctor", str(bundles["llama"]), "--json", "--quick", "--tokens", "8"])
    data = json.loads(capsys.readouterr().out)
    assert set(data) == JSON_KEYS
    assert set(data["bundle"]) == BUNDLE_KEYS
    assert {"machine", "family", "model", "features", "usable_cpus"} <= set(data["cpu"])
    assert set(data["packages"]) >= {"numpy", "onnxruntime", "tokenizers"}
    assert data["onnxruntime"]["ok"] is True
    bundle = data["bundle"]
    assert bundle["checksums_ok"] and bundle["fits_in_memory"]
    assert bundle["predicted_decode_tokens_per_s"] > 0
    measured = bundle["measured"]
    assert measured["ok"], measured
    assert measured["new_tokens"] == 8 and measured["decode_tokens_per_s"] > 0
    assert code == (1 if any(f["level"] == "warning" for f in data["findings"]) else 0)


def test_doctor_report_for_people(bundles: dict[str, Path]) -> None:
    report = make_report(bundles["qwen2"], quick=True, new_tokens=4)
    text = format_report(report)
    for label in ("bundle", "KV cache", "memory needed", "predicted", "measured"):
        assert f"\n{label} " in text


def test_doctor_on_a_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
