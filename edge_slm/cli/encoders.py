"""``edge-slm classify``, ``embed`` and ``ner``: texts from arguments or a file, JSONL out.

    edge-slm classify BUNDLE "great film" "awful service"
    edge-slm classify BUNDLE --input feedback.csv --output labels.jsonl --batch-size 32
    edge-slm embed BUNDLE --input faq.txt --output faq-vectors.jsonl
    edge-slm ner BUNDLE "Wolfgang lives in Berlin" --aggregation first

Input files are JSONL (``text``, optional ``text_pair``), CSV with a ``text`` column, or
plain text (one text per line), read lazily. Each output line is the input record's
fields plus the result (``label``, ``score``, ``labels``, ``scores``, ``truncated``;
``embedding``; or ``entities``, ``truncated``). Progress goes to stderr; results to stdout or ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from edge_slm.cli.progress import Progress, is_terminal
from edge_slm.encoders.classify import TextClassifier
from edge_slm.encoders.embed import TextEmbedder
from edge_slm.encoders.encoder import TRUNCATION_MODES
from edge_slm.encoders.entities import AGGREGATIONS
from edge_slm.encoders.token_classify import TokenClassifier
from edge_slm.errors import InvalidArgumentError
from edge_slm.text.records import Record, read_records

COMMANDS = ("classify", "embed", "ner")
_TASKS: dict[str, tuple[type[TextClassifier | TextEmbedder | TokenClassifier], str]] = {
    "classify": (TextClassifier, "text-classification"),
    "embed": (TextEmbedder, "feature-extraction"),
    "ner": (TokenClassifier, "token-classification"),
}


def add_encoder_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add the ``classify``, ``embed`` and ``ner`` subcommands to an argparse subparsers object."""
    parsers = []
    for name, help_text, description in (
        (
            "classify",
            "label texts with a text-classification bundle",
            "Label texts with a text-classification bundle. Texts come from the command\n"
            "line or a file (--input); one JSON line per text goes to stdout or --output.",
        ),
        (
            "embed",
            "turn texts into vectors with a feature-extraction bundle",
            "Turn texts into embedding vectors with a feature-extraction bundle. Texts come\n"
            "from the command line or a file (--input); one JSON line per text goes to\n"
            "stdout or --output.",
        ),
        (
            "ner",
            "find named entities (or tags) with a token-classification bundle",
            "Find named entities, or tag tokens, with a token-classification bundle: each\n"
            "entity with its label, score, word and character offsets (start, end).\n"
            "Texts come from the command line or a file (--input); one JSON line per text\n"
            "goes to stdout or --output.",
        ),
    ):
        cmd = sub.add_parser(name, help=help_text, description=description)
        cmd.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder")
        cmd.add_argument(
            "texts", nargs="*", metavar="TEXT", help="texts to process (or use --input)"
        )
        cmd.add_argument(
            "--input",
            type=Path,
            metavar="FILE",
            help="read texts from FILE: JSONL (text, optional text_pair), CSV with a text "
            "column, or plain text with one text per line",
        )
        cmd.add_argument(
            "--output", type=Path, metavar="FILE", help="write JSON lines to FILE (default: stdout)"
        )
        cmd.add_argument(
            "--batch-size", type=int, default=32, metavar="N", help="texts run together"
        )
        cmd.add_argument(
            "--truncation",
            choices=TRUNCATION_MODES,
            default="warn" if name == "embed" else "error",
            help="texts longer than the context: fail (error), cut with a warning (warn), "
            "or cut silently",
        )
        cmd.add_argument(
            "--threads",
            type=int,
            metavar="N",
            help="CPU threads to use (default: every usable CPU)",
        )
        cmd.add_argument(
            "--no-progress", action="store_true", help="no progress bar on stderr for --input"
        )
        if name == "classify":
            cmd.add_argument(
                "--top-k",
                type=int,
                metavar="K",
                help="labels per text (default: 1; all for a multi-label bundle)",
            )
            cmd.add_argument(
                "--threshold",
                type=float,
                metavar="P",
                help="keep only labels with probability >= P",
            )
        if name == "ner":
            cmd.add_argument(
                "--aggregation",
                choices=AGGREGATIONS,
                default="simple",
                help="none: every token; simple: adjacent tokens of one entity grouped; "
                "first/average/max: words first (label of their first token, of the "
                "averaged scores, of their surest token), then grouped",
            )
            cmd.add_argument(
                "--ignore-label",
                action="append",
                metavar="LABEL",
                help="leave out this label (repeat for several; default: O)",
            )
            cmd.add_argument(
                "--stride",
                type=int,
                metavar="N",
                help="tag texts longer than the context whole, in windows sharing N tokens",
            )
        parsers.append(cmd)
    return parsers


def _records(args: argparse.Namespace) -> Iterator[Record]:
    if args.input is not None and args.texts:
        raise InvalidArgumentError("give texts as arguments or --input FILE, not both")
    if args.input is not None:
        yield from read_records(args.input)
    elif args.texts:
        for text in args.texts:
            yield Record(text, None, {"text": text})
    else:
        raise InvalidArgumentError("no texts: give them as arguments or with --input FILE")


def _write(lines: Iterable[dict[str, Any]], out: TextIO) -> None:
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")


def run_encoder_command(args: argparse.Namespace) -> int:
    """Run ``classify``, ``embed`` or ``ner``; returns the exit code."""
    from edge_slm import load

    model = load(args.bundle, threads=args.threads)
    wanted, task = _TASKS[args.command]
    if not isinstance(model, wanted):
        raise InvalidArgumentError(
            f"bundle {str(args.bundle)!r} is a {model.manifest.task} bundle; "
            f"'edge-slm {args.command}' needs a {task} one"
        )
    show = args.input is not None and not args.no_progress
    verb = {"classify": "classifying", "embed": "embedding", "ner": "tagging"}[args.command]
    progress = None
    if show:
        # On a terminal, a first quick pass over the file gives the bar its total.
        total = sum(1 for _ in read_records(args.input)) if is_terminal(sys.stderr) else None
        progress = Progress(total, label=verb, unit="texts")
    pending: list[Record] = []

    def texts() -> Iterator[Any]:
        for record in _records(args):
            pending.append(record)
            yield record.text

    def results() -> Iterator[dict[str, Any]]:
        if isinstance(model, TextClassifier):
            batches: Iterator[list[Any]] = model.classify_batches(
                texts(),
                top_k=args.top_k,
                threshold=args.threshold,
                batch_size=args.batch_size,
                truncation=args.truncation,
            )
            convert: Callable[[Any], dict[str, Any]] = _classification
        elif isinstance(model, TokenClassifier):
            batches = model.classify_batches(
                texts(),
                aggregation=args.aggregation,
                ignore_labels=args.ignore_label,
                batch_size=args.batch_size,
                truncation=args.truncation,
                stride=args.stride,
            )
            convert = _classification
        else:
            batches = (
                list(b)
                for b in model.embed_batches(
                    texts(), batch_size=args.batch_size, truncation=args.truncation
                )
            )
            convert = _embedding
        for batch in batches:
            records = pending[: len(batch)]
            del pending[: len(batch)]
            for record, result in zip(records, batch, strict=True):
                yield {**record.row, **convert(result)}
            if progress:
                progress.update(len(batch))

    with ExitStack() as stack:
        out = (
            stack.enter_context(open(args.output, "w", encoding="utf-8"))
            if args.output
            else sys.stdout
        )
        if progress:
            stack.callback(progress.close)
        _write(results(), out)
    return 0


def _classification(result: Any) -> dict[str, Any]:
    return dict(result.to_dict())


def _embedding(vector: Any) -> dict[str, Any]:
    return {"embedding": [round(float(v), 7) for v in vector]}
