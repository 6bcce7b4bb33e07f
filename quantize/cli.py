"""``edge-slm quantize BUNDLE OUT_DIR --method int4-search|int8|...``: argument parsing only.

Progress goes to stderr; the summary (sizes, quantized MatMuls, perplexities) to stdout.
Options left out take the method's defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_slm.bundle import Quantization, read_manifest
from edge_slm.cli.progress import stderr_reporter
from edge_slm.errors import EdgeSlmError
from edge_slm.generation.perplexity import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW
from edge_slm_quantize.bundle import quantize_bundle
from edge_slm_quantize.methods import ALIASES, METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the quantize command."""
    parser.add_argument("bundle", type=Path, help="fp32 bundle folder to quantize")
    parser.add_argument("out_dir", type=Path, help="quantized bundle folder to write")
    methods = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    methods += (
        "; encoder bundles: dynamic-int8, static-int8 (see python -m edge_slm_quantize.encoder -h)"
    )
    methods += "; former names, still accepted: " + ", ".join(
        f"{old} (now {new})" for old, new in sorted(ALIASES.items())
    )
    parser.add_argument(
        "--method", required=True, choices=sorted([*METHODS, *ALIASES]), help=methods
    )
    parser.add_argument("--eval-text", type=Path, help="UTF-8 text file: perplexity before/after")
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens of --eval-text to score at most (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"perplexity window in tokens, capped by the context length (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--block-size", type=int, help="weights per scale (default: the method's, 32)"
    )
    parser.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric quantization, no zero points (default: the method's, asymmetric)",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        help="MatMulNBits compute: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 (default: the method's)",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        help="method gguf: the source GGUF file if it moved since the export (sha256 checked)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f} MB"


def summary(out: Path, quantization: Quantization) -> str:
    """Human-readable lines about a quantized bundle (what the CLI prints on stdout)."""
    q = quantization
    details = q.details
    lines = [
        f"bundle: {out}",
        f"method: {q.method} ({q.bits}-bit, block {q.block_size}, "
        f"{'symmetric' if q.symmetric else 'asymmetric'}, accuracy_level {q.accuracy_level or 0})",
        f"size: {_megabytes(q.size_before_bytes)} -> {_megabytes(q.size_after_bytes)}",
        f"matmuls: {details.get('quantized_matmuls')} quantized, "
        f"{details.get('remaining_float_matmuls')} with float weights left; "
        f"lm_head {details.get('lm_head')}",
    ]
    if q.perplexity_before is not None and q.perplexity_after is not None:
        change = 100 * (q.perplexity_after / q.perplexity_before - 1)
        lines.append(
            f"perplexity: {q.perplexity_before:.3f} -> {q.perplexity_after:.3f} ({change:+.1f}%) "
            f"on {q.eval_tokens} tokens of {q.eval_text}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Quantize, then print the summary; errors go to stderr with exit code 2."""
    try:
        out = quantize_bundle(
            args.bundle,
            args.out_dir,
            args.method,
            eval_text=args.eval_text,
            block_size=args.block_size,
            symmetric=args.symmetric,
            accuracy_level=args.accuracy_level,
            eval_tokens=args.eval_tokens,
            window=args.window,
            overwrite=args.overwrite,
            report=stderr_reporter,
            gguf_path=args.gguf,
        )
        manifest, _ = read_manifest(out)
    except EdgeSlmError as exc:
        print(f"edge-slm quantize: error: {exc}", file=sys.stderr)
        return 2
    print(summary(out, manifest.quantization))
    return 0


def build_parser(prog: str = "python -m edge_slm_quantize") -> argparse.ArgumentParser:
    """The parser of the decoder methods."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return parser


def _method(argv: Sequence[str]) -> str | None:
    """The value of ``--method`` in ``argv`` (either ``--method X`` or ``--method=X``)."""
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None, prog: str = "python -m edge_slm_quantize") -> int:
    """Entry point of ``python -m edge_slm_quantize`` and ``edge-slm quantize``.

    Encoder methods (dynamic-int8, static-int8) go to :mod:`edge_slm_quantize.encoder`, whose
    options (calibration, evaluation, accuracy gate) differ from the decoders'.
    """
    from edge_slm_quantize import encoder

    argv = list(sys.argv[1:] if argv is None else argv)
    if _method(argv) in encoder.ENCODER_METHODS:
        return encoder.main(argv, prog=prog)
    return run(build_parser(prog).parse_args(argv))
