"""32-bit Raspberry Pi OS (armhf): `pip install edge-slm` and `edge-slm doctor` say "64-bit OS".

onnxruntime publishes no 32-bit ARM wheels. The package is a pure-Python wheel (no install
code runs), so pyproject.toml requires ``edge-slm-needs-a-64-bit-os`` on 32-bit ARM
machines only: a name no index has, which pip reports as "No matching distribution found
for edge-slm-needs-a-64-bit-os". These tests check the marker logic (pip evaluates it
with the installing interpreter's platform, so it cannot be faked with ``--platform``)
and the doctor's warning, on a Raspberry Pi 4's /proc/cpuinfo. Fast: part of the
default run (the emulated arm64 run is `make test-arm64`, tests/arm64/run.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from edge_slm.cli.doctor import diagnose
from edge_slm.engine.device import (
    DeviceFacts,
    DiskFacts,
    MemoryFacts,
    OnnxRuntimeCheck,
    PythonFacts,
    parse_cpuinfo,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
GUARD = "edge-slm-needs-a-64-bit-os"
PI4_CPUINFO = (Path(__file__).parent / "cpuinfo-pi4.txt").read_text()


def _requirements_on(machine: str) -> list[str]:
    """The runtime requirements pip installs on a Linux machine whose `uname -m` is ``machine``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {**default_environment(), "platform_machine": machine, "sys_platform": "linux"}
    chosen = []
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(env):
            chosen.append(requirement.name)
    return chosen


@pytest.mark.parametrize("machine", ["armv7l", "armv6l", "armv8l"])
def test_32_bit_arm_asks_for_the_64_bit_os(machine: str) -> None:
    assert GUARD in _requirements_on(machine)


@pytest.mark.parametrize("machine", ["aarch64", "x86_64", "arm64", "AMD64"])
def test_64_bit_machines_install_the_runtime_only(machine: str) -> None:
    assert _requirements_on(machine) == ["numpy", "onnxruntime", "tokenizers"]


def _facts(machine: str, bits: int) -> DeviceFacts:
    return DeviceFacts(
        cpu=parse_cpuinfo(
            PI4_CPUINFO.replace("asimd", "neon") if bits == 32 else PI4_CPUINFO, machine
        ),
        memory=MemoryFacts(4 << 30, 3 << 30, 0, 0),
        disk=DiskFacts("/", 20 << 30, 30 << 30),
        python=PythonFacts("3.11.2", "CPython", "/usr/bin/python3", bits, "Linux", "6.6", ""),
        packages={"numpy": "2.0", "onnxruntime": None, "tokenizers": "0.21"},
    )


@pytest.mark.parametrize(
    "machine",
    [
        "armv7l",  # Raspberry Pi OS 32-bit on a 32-bit kernel (Pi 2, 3, Zero 2 W; older images)
        "aarch64",  # Raspberry Pi OS 32-bit on a 64-bit kernel (Pi 4/5 images since 2023):
        # the marker sees aarch64, pip fails on onnxruntime instead; the doctor still knows
    ],
)
def test_doctor_says_use_the_64_bit_os(machine: str) -> None:
    found = diagnose(_facts(machine, bits=32), OnnxRuntimeCheck(False, 1, error="no module"))
    warnings = [f.message for f in found if f.level == "warning"]
    assert any("32-bit" in m and "64-bit OS" in m for m in warnings), warnings


def test_doctor_quiet_about_bits_on_64_bit_pi_os() -> None:
    facts = _facts("aarch64", bits=64)
    facts = DeviceFacts(facts.cpu, facts.memory, facts.disk, facts.python, {
        **facts.packages, "onnxruntime": "1.20.1"})  # fmt: skip
    found = diagnose(facts, OnnxRuntimeCheck(True, 0, "1.20.1", ("CPUExecutionProvider",)))
    assert not any("32-bit" in f.message for f in found)
