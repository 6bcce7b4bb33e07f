"""``edge-slm export SOURCE OUT_DIR [--quantize METHOD]``: argument parsing only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_slm.cli.progress import stderr_reporter
from edge_slm.errors import EdgeSlmError
from edge_slm_export.decoder import DEFAULT_TOLERANCE, ExportOptions, export_decoder
from edge_slm_export.encoder import DEFAULT_TOLERANCE as ENCODER_TOLERANCE
from edge_slm_export.encoder import ENCODER_TASKS, EncoderExportOptions, detect_task, export_encoder


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
    parser.add_argument(
        "--graph",
        choices=("auto", "optimum", "fused"),
        default="auto",
        help="fused GroupQueryAttention graph (GPT-2, Llama, Qwen2: export/architectures/) "
        "or optimum's plain graph; "
        "auto (default): fused where supported",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--quantize",
        action="append",
        default=[],
        metavar="METHOD",
        help="also write OUT_DIR-METHOD quantized with METHOD (repeatable, e.g. int4-search, int8; gguf: "
        "a .gguf source's own blocks, with --graph fused)",
    )
    parser.add_argument("--eval-text", type=Path, help="text file for perplexity before/after")
    # Encoders (text-classification, feature-extraction); see export/encoder.py.
    parser.add_argument(
        "--task",
        choices=("text-generation", *ENCODER_TASKS),
        help="default: detected from the source's config.json (text-generation if unsure)",
    )
    parser.add_argument(
        "--pooling", choices=("mean", "cls"), help="feature-extraction: override 1_Pooling"
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feature-extraction: L2-normalise embeddings (default: as 2_Normalize says)",
    )
    parser.add_argument("--max-length", type=int, help="encoders: cap tokens per input")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle checkpoints (.bin), which run code when loaded "
        "(default: safetensors weights only)",
    )


def run(args: argparse.Namespace) -> int:
    """Export, then quantize if asked; prints the bundle folders on stdout."""
    task = args.task or detect_task(args.source)
    if task in ENCODER_TASKS:
        return _run_encoder(args, task)
    try:
        bundle = export_decoder(
            args.source,
            args.out_dir,
            ExportOptions(
                tolerance=args.tolerance,
                opset=args.opset,
                overwrite=args.overwrite,
                graph=args.graph,
                allow_pickle=args.allow_pickle,
            ),
            report=stderr_reporter,
        )
        print(bundle)
        if args.quantize:
            from edge_slm_quantize.bundle import quantize_bundle

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


def _run_encoder(args: argparse.Namespace, task: str) -> int:
    """Export an encoder bundle, then quantize it with the encoder methods if asked.

    The decoder's default ``--tolerance`` (1e-3) becomes the encoders' 1e-4.
    """
    tolerance = ENCODER_TOLERANCE if args.tolerance == DEFAULT_TOLERANCE else args.tolerance
    try:
        bundle = export_encoder(
            args.source,
            args.out_dir,
            task,  # type: ignore[arg-type]
            EncoderExportOptions(
                tolerance=tolerance,
                opset=args.opset,
                overwrite=args.overwrite,
                pooling=args.pooling,
                normalize=args.normalize,
                max_length=args.max_length,
                allow_pickle=args.allow_pickle,
            ),
            report=stderr_reporter,
        )
        print(bundle)
        if args.quantize:
            from edge_slm_quantize.encoder import quantize_encoder_bundle

            for method in args.quantize:
                out = bundle.with_name(f"{bundle.name}-{method}")
                quantize_encoder_bundle(
                    bundle, out, method, overwrite=args.overwrite, report=stderr_reporter
                )
                print(out)
    except EdgeSlmError as exc:
        print(f"edge-slm export: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m edge_slm_export") -> int:
    """Entry point of ``python -m edge_slm_export`` and ``edge-slm export``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
