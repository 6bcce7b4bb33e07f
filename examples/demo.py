"""The main job, offline: SmolLM2-135M-Instruct from a GGUF file to three bundles and a chat.

1. export the GGUF (de-quantized by transformers) to an fp32 ONNX bundle, validated
   against torch;
2. quantize it to 8-bit and 4-bit weight-only bundles, with perplexity before/after
   on real English prose when the text is there;
3. load each bundle with the torch-free runtime and answer a chat question, printing
   bundle sizes, load time, time to first token and tokens/s.

Run by ``make demo`` (which fetches the assets first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUESTION = "What is the capital of France?"
# bundle suffix -> quantization method (see quantize/methods/)
VARIANTS = {
    "int8": "int8",  # 8-bit weight-only, int8 activations
    # 4-bit, best quality: the GGUF's own Q4_1 layer blocks carried over unchanged, the
    # Q8_0 embedding / lm_head re-quantized to 4 bits (searched scales), stored once
    "int4": "gguf-head4",
    # 4-bit, smallest and fastest: every weight re-quantized with searched scales
    "int4-small": "int4-search",
}


def bundle_size(folder: Path) -> int:
    """Bytes of every file in a bundle."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(gguf: Path, out: Path, eval_text: Path | None, rebuild: bool) -> dict[str, Path]:
    """Export and quantize (skipped for bundles that already exist and check out)."""
    from edge_slm.bundle import read_bundle
    from edge_slm.cli.progress import stderr_reporter
    from edge_slm.errors import BundleError
    from edge_slm_export import ExportOptions, export_decoder
    from edge_slm_quantize.bundle import quantize_bundle

    def fresh(folder: Path) -> bool:
        try:
            read_bundle(folder)
        except BundleError:
            return False
        return not rebuild

    bundles = {"fp32": out / "smollm2-135m-instruct"}
    if not fresh(bundles["fp32"]):
        export_decoder(
            str(gguf), bundles["fp32"], ExportOptions(overwrite=True), report=stderr_reporter
        )
        rebuild = True  # the quantized bundles must come from this export
    for name, method in VARIANTS.items():
        bundles[name] = out / f"smollm2-135m-instruct-{name}"
        if not fresh(bundles[name]):
            quantize_bundle(
                bundles["fp32"],
                bundles[name],
                method,
                eval_text=eval_text,
                overwrite=True,
                report=stderr_reporter,
            )
    return bundles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    parser.add_argument("--out", type=Path, default=Path("bundles"))
    parser.add_argument("--rebuild", action="store_true", help="export and quantize again")
    args = parser.parse_args()
    gguf = args.assets / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        print(f"missing {gguf}: run examples/fetch_assets.py first", file=sys.stderr)
        return 1
    eval_text = args.assets / "war-of-the-worlds.txt"
    bundles = build(gguf, args.out, eval_text if eval_text.is_file() else None, args.rebuild)

    import edge_slm

    int8 = edge_slm.load(bundles["int8"], verify=False).manifest.quantization
    fp32_perplexity = int8.perplexity_before
    rows = []
    messages = [{"role": "user", "content": QUESTION}]
    print(f"\nQ: {QUESTION}")
    for name, folder in bundles.items():
        model = edge_slm.load(folder)
        result = model.chat(messages, max_new_tokens=64, temperature=0.0)
        t = result.timings
        q = model.manifest.quantization
        # A quantized bundle records its fp32 source's perplexity as "before".
        ppl = q.perplexity_after if q.method != "none" else fp32_perplexity
        print(f"A ({name}): {result.text.strip()}")
        rows.append(
            (name, q.method, bundle_size(folder) / 1e6, t.load_s, t.time_to_first_token_s,
             t.prompt_tokens_per_s, t.decode_tokens_per_s, ppl)
        )  # fmt: skip
    print(
        f"\n{'bundle':<12} {'method':<12} {'size MB':>8} {'load s':>7} {'TTFT s':>7} "
        f"{'prompt tok/s':>13} {'decode tok/s':>13} {'perplexity':>11}"
    )
    for name, method, size, load, ttft, ptps, dtps, ppl in rows:
        ppl_text = f"{ppl:.2f}" if ppl else "-"
        print(
            f"{name:<12} {method:<12} {size:>8.1f} {load:>7.2f} {ttft:>7.3f} {ptps:>13.1f} "
            f"{dtps:>13.1f} {ppl_text:>11}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
