"""``edge-slm batch``: score a whole file with a bundle, resumably, here or on Ray.

    edge-slm batch bundles/router tickets.jsonl routed.jsonl
    edge-slm batch bundles/minilm faq.csv faq-vectors.parquet --task embed --id-column id
    edge-slm batch bundles/smollm2 prompts.jsonl answers.jsonl --task chat --temperature 0
    edge-slm batch bundles/router tickets.parquet routed.parquet --workers 2
    edge-slm batch bundles/router s.jsonl out.jsonl --ray 10.0.0.5:6379 --cpus-per-worker 4

Without ``--workers`` or ``--ray`` it runs in this process (no Ray needed). The job runs
in blocks (:mod:`edge_slm.scale.blocks`): interrupted, the same command resumes where
it stopped. Each output row is the input row's fields, the task's results and an
``error`` field (None, or why that row failed: the row's number and id).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_slm.bundle import read_manifest
from edge_slm.cli.progress import Progress, is_terminal
from edge_slm.encoders.encoder import TRUNCATION_MODES
from edge_slm.encoders.entities import AGGREGATIONS
from edge_slm.errors import InvalidArgumentError
from edge_slm.scale.blocks import DEFAULT_BLOCK_SIZE, BlockJob, Engine, JobReport, local_engine
from edge_slm.scale.tables import read_rows
from edge_slm.scale.tasks import BUNDLE_TASKS, TASKS, RowScorer, TaskSpec

_DESCRIPTION = """\
Score every row of a JSONL, CSV or Parquet file with a bundle: classify, embed,
ner (entities), generate (the text is the prompt) or chat (the text is the user
message). The output (same formats, by suffix) has each input row's fields, the
results and an 'error' field naming any row that failed; a bad row never stops the
others.

The work goes in blocks of rows, each saved beside OUTPUT (OUTPUT.parts/) as it
finishes: run the same command again after an interruption and it computes only the
blocks not done. Runs in this process by default; --workers N runs N actors on a local
Ray cluster, --ray ADDRESS on an existing one (pip install 'edge-slm[ray]'; Parquet
needs it too)."""


def add_batch_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand to an argparse subparsers object."""
    cmd: argparse.ArgumentParser = sub.add_parser(
        "batch",
        help="score a whole file (resumable; on Ray with --workers)",
        description=_DESCRIPTION,
    )
    cmd.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder")
    cmd.add_argument(
        "input", type=Path, metavar="INPUT", help="input file (.jsonl, .csv, .parquet)"
    )
    cmd.add_argument(
        "output", type=Path, metavar="OUTPUT", help="output file (.jsonl, .csv, .parquet)"
    )
    cmd.add_argument(
        "--task",
        choices=TASKS,
        help="what to compute (default: classify, embed, ner or generate, by the bundle)",
    )
    cmd.add_argument("--text-column", default="text", metavar="NAME", help="field with the text")
    cmd.add_argument("--id-column", metavar="NAME", help="field naming each row in errors")
    cmd.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="N",
        help="rows per block (saved, resumed and scheduled as one)",
    )
    cmd.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="rows run through the model together",
    )
    ray = cmd.add_argument_group("Ray (pip install 'edge-slm[ray]')")
    ray.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray actors, each loading the bundle once (without --ray: a local cluster of "
        "N x --cpus-per-worker CPUs; with --ray, default: the cluster's CPUs / --cpus-per-worker)",
    )
    ray.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on the Ray cluster at ADDRESS ('auto', HOST:PORT or ray://HOST:PORT); "
        "BUNDLE must be readable at the same path on its nodes",
    )
    ray.add_argument(
        "--upload-bundle",
        action="store_true",
        help="send BUNDLE with the job (Ray's runtime_env working_dir, at most 512 MiB) "
        "instead of reading it at the same path on every node",
    )
    ray.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        metavar="N",
        help="CPUs per actor, and its onnxruntime threads",
    )
    cmd.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads without Ray (default: every usable CPU)",
    )
    enc = cmd.add_argument_group("classify, embed and ner")
    enc.add_argument(
        "--truncation",
        choices=TRUNCATION_MODES,
        help="texts over the context: the row fails (error), or is cut (warn, silent); "
        "default: error for classify, warn for embed",
    )
    enc.add_argument("--top-k", type=int, metavar="K", help="labels per row (classify)")
    enc.add_argument(
        "--threshold", type=float, metavar="P", help="keep labels with probability >= P"
    )
    ner = cmd.add_argument_group("ner")
    ner.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        help="how tokens group into entities (default: simple)",
    )
    ner.add_argument(
        "--stride",
        type=int,
        metavar="N",
        help="tag long texts whole, in windows sharing N tokens",
    )
    gen = cmd.add_argument_group("generate and chat (default: the bundle's settings)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per answer at most")
    gen.add_argument("--temperature", type=float, metavar="T", help="0: greedy")
    gen.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    gen.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of every row's sampler: the same row gives the same text on any worker",
    )
    gen.add_argument("--system", metavar="TEXT", help="system message (chat)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return cmd


def _spec(args: argparse.Namespace) -> TaskSpec:
    task = args.task
    if task is None:
        manifest, _ = read_manifest(args.bundle)
        if manifest.task not in BUNDLE_TASKS:
            raise InvalidArgumentError(f"bundle task {manifest.task!r} has no batch task")
        task = BUNDLE_TASKS[manifest.task][0]
    generation = {
        name: value
        for name in ("max_new_tokens", "temperature", "top_p", "seed")
        if (value := getattr(args, name)) is not None
    }
    return TaskSpec(
        task,
        batch_size=args.batch_size,
        truncation=args.truncation,
        top_k=args.top_k,
        threshold=args.threshold,
        aggregation=args.aggregation,
        stride=args.stride,
        system=args.system,
        generation=generation,
    )


def _engine(args: argparse.Namespace, spec: TaskSpec) -> Engine:
    if args.workers is None and args.ray is None:
        if args.upload_bundle:
            raise InvalidArgumentError("--upload-bundle needs --ray ADDRESS or --workers N")
        return local_engine(RowScorer(args.bundle, spec, threads=args.threads))
    if args.threads is not None:
        raise InvalidArgumentError("--threads is for runs without Ray; use --cpus-per-worker")
    from edge_slm.scale.ray_data import ray_engine  # needs the ray extra

    return ray_engine(
        args.bundle.resolve(),
        spec,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        address=args.ray,
        upload_bundle=args.upload_bundle,
    )


def run_batch(args: argparse.Namespace) -> int:
    """Run ``edge-slm batch``; returns the exit status (0 also when rows had errors)."""
    spec = _spec(args)
    job = BlockJob(
        args.input,
        args.output,
        args.bundle,
        spec,
        text_column=args.text_column,
        id_column=args.id_column,
        block_size=args.block_size,
    )
    engine = _engine(args, spec)
    # On a terminal, a first quick pass over the file gives the bar its total.
    total = None
    if not args.no_progress and is_terminal(sys.stderr):
        total = sum(1 for _ in read_rows(args.input))
    with Progress(total, label=spec.task, unit="rows", enabled=not args.no_progress) as bar:
        report = job.run(engine, on_rows=bar.update)
    _summary(report, args.output)
    return 0


def _summary(report: JobReport, output: Path) -> None:
    earlier = f", {report.reused_rows:,} of them from an earlier run" if report.reused_rows else ""
    print(
        f"edge-slm batch: {report.rows:,} rows -> {output}{earlier} "
        f"({report.computed_rows:,} computed now)",
        file=sys.stderr,
    )
    if report.error_count:
        print(
            f"edge-slm batch: {report.error_count:,} row(s) failed (see their 'error' field):",
            file=sys.stderr,
        )
        for message in report.first_errors:
            print(f"  {message}", file=sys.stderr)
        if report.error_count > len(report.first_errors):
            print(
                f"  ... and {report.error_count - len(report.first_errors):,} more", file=sys.stderr
            )
