"""The 4-bit frontier on SmolLM2-135M-Instruct: file size vs perplexity vs decode speed.

Usage (from the repository root, after ``make demo`` or ``make bench`` built
``bundles/smollm2-fused``):

    .venv/bin/python benchmarks/bench_frontier.py [--rounds 2] [--out docs/quantization-frontier.md]

Each configuration is one registry method with its settings (block size, symmetric or
not, accuracy level); its bundle is built once into ``bundles/frontier/`` (perplexity on
War of the Worlds, 4,096 tokens, 512-token windows, recorded in the manifest by
``quantize_bundle``) and then benchmarked with ``edge-slm bench`` in a fresh process,
the configurations interleaved round after round on this noisy machine; decode tok/s is
the median, and ``x ref`` the median of per-round ratios to the reference configuration
(``int4-search``, block 32) measured in the same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSED = ROOT / "bundles/smollm2-fused"
OUT_DIR = ROOT / "bundles/frontier"
EVAL_TEXT = ROOT / ".cache/assets/war-of-the-worlds.txt"


@dataclass(frozen=True)
class Config:
    """One point: a registry method and the settings that differ from its defaults."""

    method: str
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.block_size:
            parts.append(f"b{self.block_size}")
        if self.symmetric is not None:
            parts.append("sym" if self.symmetric else "asym")
        if self.accuracy_level is not None:
            parts.append(f"acc{self.accuracy_level}")
        return "-".join(parts)


REFERENCE = Config("int4-search")
CONFIGS = [
    REFERENCE,
    Config("int4-search", symmetric=False),
    Config("int4-search", block_size=64),
    Config("int4-search", accuracy_level=1),
    Config("int4-rtn-shared"),  # onnxruntime's round-to-nearest, asymmetric
    Config("int4-rtn-shared", symmetric=True),  # ... symmetric, as onnxruntime-genai's builder
    Config("int4-rtn-emb8"),
    Config("gguf-head4"),
    Config("gguf"),
]


def build(config: Config) -> Path:
    """The configuration's bundle, built once."""
    from edge_slm.bundle import read_manifest
    from edge_slm.errors import BundleError
    from edge_slm_quantize.bundle import quantize_bundle

    folder = OUT_DIR / config.name
    try:
        read_manifest(folder)
        return folder
    except BundleError:
        pass
    print(f"building {config.name}", file=sys.stderr, flush=True)
    return quantize_bundle(
        FUSED,
        folder,
        config.method,
        eval_text=EVAL_TEXT,
        window=512,
        block_size=config.block_size,
        symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        overwrite=True,
    )


def bench(folder: Path) -> dict[str, float]:
    """``edge-slm bench --json`` in a fresh process (cold load: no prepared-session cache)."""
    command = [sys.executable, "-m", "edge_slm.cli.main", "bench", str(folder), "--json"]
    command += ["--repeats", "3", "--no-cache"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bench failed for {folder}:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/quantization-frontier.md")
    args = parser.parse_args()
    if not FUSED.exists():
        raise SystemExit(f"{FUSED} is missing: run `make demo` or `make bench` first")
    from edge_slm.bundle import read_manifest

    folders = {config: build(config) for config in CONFIGS}
    runs: dict[Config, list[dict[str, float]]] = {config: [] for config in CONFIGS}
    for round_ in range(args.rounds):
        for config, folder in folders.items():
            runs[config].append(bench(folder))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    lines = [
        "| configuration | bits / block / layout / accuracy level | file MiB | perplexity | "
        "decode tok/s | x ref | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, folder in folders.items():
        manifest, _ = read_manifest(folder)
        q = manifest.quantization
        settings = (
            f"{q.bits} / {q.block_size} / {'sym' if q.symmetric else 'asym'} / {q.accuracy_level}"
        )
        size = sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20
        decode = [r["decode_tokens_per_s"] for r in runs[config]]
        ratios = [
            r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            for r, ref in zip(runs[config], runs[REFERENCE], strict=True)
        ]
        rss = statistics.median(r["peak_rss_bytes"] for r in runs[config]) / 2**20
        ppl = f"{q.perplexity_after:.2f}" if q.perplexity_after else "n/a"
        lines.append(
            f"| {config.name} | {settings} | {size:.1f} | {ppl} | "
            f"{statistics.median(decode):.1f} | {statistics.median(ratios):.2f} | {rss:.0f} |"
        )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = "\n".join(lines)
    kept = ""  # hand-written notes from "## Reading it" on are kept
    if args.out.exists():
        old = args.out.read_text(encoding="utf-8")
        if "\n## Reading it" in old:
            kept = "\n" + old[old.index("\n## Reading it") + 1 :]
    args.out.write_text(
        "# The 4-bit frontier: SmolLM2-135M-Instruct\n\n"
        f"Measured {when} by `benchmarks/bench_frontier.py` ({args.rounds} interleaved "
        "rounds, fresh process per run, cold load; fp32 perplexity 35.64). Perplexity: War "
        "of the Worlds, 4,096 tokens, 512-token windows. `x ref`: decode speed relative to "
        "`int4-search` in the same round. For the GGUF rows, block size and symmetry "
        "describe the carried Q4_1 blocks' container (MatMulNBits block 32 with offsets).\n\n"
        + table
        + "\n"
        + kept,
        encoding="utf-8",
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
