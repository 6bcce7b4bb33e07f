"""``edge-slm export SOURCE OUT_DIR [--quantize METHOD]``: argument parsing only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_slm.errors import EdgeSlmError
from export.decoder import DEFAULT_TOLERANCE, ExportOptions, export_decoder
from export.progress import stderr_reporter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the export command."""
    parser.add_argument("source", help="hub id (org/name), local HF folder, or .gguf file")
    parser.add_argument("out_dir", type=Path, help="bundle folder to write")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"max |logit difference| ONNX vs torch (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: optimum's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--quantize",
        action="append",
        default=[],
        metavar="METHOD",
        help="also write OUT_DIR-METHOD quantized with METHOD (repeatable, e.g. int4, int8)",
    )
    parser.add_argument("--eval-text", type=Path, help="text file for perplexity before/after")


def run(args: argparse.Namespace) -> int:
    """Export, then quantize if asked; prints the bundle folders on stdout."""
    try:
        bundle = export_decoder(
            args.source,
            args.out_dir,
            ExportOptions(tolerance=args.tolerance, opset=args.opset, overwrite=args.overwrite),
            report=stderr_reporter,
        )
        print(bundle)
        if args.quantize:
            from quantize.bundle import quantize_bundle

            for method in args.quantize:
                out = bundle.with_name(f"{bundle.name}-{method}")
                quantize_bundle(
                    bundle,
                    out,
                    method,
                    eval_text=args.eval_text,
                    overwrite=args.overwrite,
                    report=stderr_reporter,
                )
                print(out)
    except EdgeSlmError as exc:
        print(f"edge-slm export: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m export``."""
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
