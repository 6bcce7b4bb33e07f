"""A resumable batch job: one input file in blocks of rows, one output file in order.

The input is read lazily and cut into blocks of ``block_size`` rows (block ``k`` holds
rows ``k * block_size`` to ``(k + 1) * block_size - 1``). Each finished block is
written as JSON lines to ``OUTPUT.parts/block-<k>-<digest>.jsonl`` (written to a
temporary name, synced, then renamed: a block file is there whole or not at all),
where the digest is the sha256 of the block's input rows. ``OUTPUT.parts/job.json``
records the job's settings (bundle, task and options but the batch size, columns,
block size).

Run again after an interruption (Ctrl-C, a kill, a lost machine), the job skips every
block whose file exists for the same input rows and computes only the rest; a block
whose input rows changed is computed again. When every block is there, the output is
assembled from the parts in order (to a temporary name, then renamed) and the parts
folder removed. Settings that differ from ``job.json`` stop the job with an error
rather than mix the results of two jobs.

How the rows are computed is the *engine*'s business: the job hands it an iterator of
:class:`Work` (one per block still to do, in order) and takes back one list of result
dicts per work item, in the same order. :func:`local_engine` computes in this process;
:func:`edge_slm.scale.ray_data.ray_engine` on a Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from edge_slm.errors import InvalidArgumentError
from edge_slm.scale.tables import InputRow, assemble, file_format, json_line, read_rows
from edge_slm.scale.tasks import ERROR_FIELD, RowScorer, TaskSpec, row_name

JOB_FORMAT = 1
DEFAULT_BLOCK_SIZE = 1000
MAX_BLOCK_SIZE = 1_000_000
FIRST_ERRORS = 5  # row errors the report keeps word for word


@dataclass(frozen=True)
class Work:
    """The rows of one block that need the model: their texts and, for errors, names."""

    texts: list[str]
    names: list[str]


Engine = Callable[[Iterator[Work]], Iterator[list[dict[str, Any]]]]
"""Work items in, one list of result dicts per item out, in the same order."""


def local_engine(scorer: RowScorer) -> Engine:
    """An engine computing every block in this process with ``scorer``."""

    def run(works: Iterator[Work]) -> Iterator[list[dict[str, Any]]]:
        for work in works:
            yield scorer.score(work.texts, work.names)

    return run


@dataclass
class JobReport:
    """What a run did: rows in all, computed now, taken from an earlier run; row errors."""

    rows: int = 0
    computed_rows: int = 0
    reused_rows: int = 0
    blocks: int = 0
    reused_blocks: int = 0
    error_count: int = 0
    first_errors: list[str] = field(default_factory=list)

    def count_errors(self, rows: list[dict[str, Any]]) -> None:
        """Add the rows of one block that have an error."""
        for row in rows:
            message = row.get(ERROR_FIELD)
            if message is not None:
                self.error_count += 1
                if len(self.first_errors) < FIRST_ERRORS:
                    self.first_errors.append(str(message))


@dataclass(frozen=True)
class _Block:
    index: int
    first_row: int
    rows: list[InputRow]
    digest: str

    @property
    def file_name(self) -> str:
        return f"block-{self.index:08d}-{self.digest[:16]}.jsonl"


class BlockJob:
    """Score ``input`` with a bundle into ``output`` (JSONL, CSV or Parquet), resumably.

    Args:
        input: the input file (``.jsonl``, ``.ndjson``, ``.csv`` or ``.parquet``).
        output: the output file (same suffixes); every input field is kept, then the
            task's result fields (replacing input fields of the same name), then
            ``error``.
        bundle: the bundle folder (its manifest is part of the job's identity).
        spec: what to compute per row.
        text_column: the field holding each row's text.
        id_column: a field naming each row in errors (optional).
        block_size: rows per block: the unit that is written, resumed and (on Ray)
            scheduled.

    Raises:
        InvalidArgumentError: a bad file type, block size or column, or an
            ``OUTPUT.parts`` folder left by a job with other settings.
    """

    def __init__(
        self,
        input: Path,
        output: Path,
        bundle: Path,
        spec: TaskSpec,
        *,
        text_column: str = "text",
        id_column: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise InvalidArgumentError(f"block_size must be an integer, got {block_size!r}")
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise InvalidArgumentError(
                f"block_size must be in [1, {MAX_BLOCK_SIZE:,}], got {block_size}"
            )
        if not text_column:
            raise InvalidArgumentError("text_column must name a field, got ''")
        file_format(input)
        self.out_kind = file_format(output)
        if not input.exists():  # a file, or a named pipe
            raise InvalidArgumentError(f"input file {str(input)!r} does not exist")
        if not output.parent.is_dir():
            raise InvalidArgumentError(f"output folder {str(output.parent)!r} does not exist")
        if output.resolve() == input.resolve():
            raise InvalidArgumentError("the output file must not be the input file")
        manifest = bundle / "manifest.json"
        if not manifest.is_file():
            raise InvalidArgumentError(f"{str(bundle)!r} is not a bundle (no manifest.json)")
        self.input, self.output, self.spec = input, output, spec
        self.text_column, self.id_column, self.block_size = text_column, id_column, block_size
        self.parts = output.with_name(output.name + ".parts")
        settings = {
            "format": JOB_FORMAT,
            "bundle_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            # batch_size only groups rows for the graph: a resumed job may change it
            "task": {k: v for k, v in spec.to_dict().items() if k != "batch_size"},
            "text_column": text_column,
            "id_column": id_column,
            "block_size": block_size,
        }
        # as job.json will hold them (tuples become lists), for comparing with it
        self.settings: dict[str, Any] = json.loads(json.dumps(settings))

    def run(self, engine: Engine, on_rows: Callable[[int], None] | None = None) -> JobReport:
        """Compute the blocks not done yet with ``engine``, then assemble the output.

        ``on_rows(n)`` is called as blocks finish (or are found done) with their row
        counts, for progress. Returns what was done.
        """
        self._open_parts()
        report = JobReport()
        in_order: list[Path] = []
        queue: deque[_Block] = deque()

        def works() -> Iterator[Work]:
            for block in self._blocks():
                path = self.parts / block.file_name
                in_order.append(path)
                report.blocks += 1
                report.rows += len(block.rows)
                if path.is_file():  # finished by an earlier run
                    report.reused_blocks += 1
                    report.reused_rows += len(block.rows)
                    report.count_errors(_read_part(path))
                    if on_rows:
                        on_rows(len(block.rows))
                    continue
                queue.append(block)
                yield self._work(block)

        for results in engine(works()):
            block = queue.popleft()
            rows = self._merge(block, results)
            self._write_part(block, rows)
            report.computed_rows += len(rows)
            report.count_errors(rows)
            if on_rows:
                on_rows(len(rows))
        if queue:
            raise RuntimeError(f"the engine returned no results for {len(queue)} block(s)")
        self._assemble(in_order)
        return report

    # ------------------------------------------------------------------ blocks
    def _blocks(self) -> Iterator[_Block]:
        rows = read_rows(self.input)
        index = 0
        while chunk := list(islice(rows, self.block_size)):
            digest = hashlib.sha256()
            for row in chunk:
                digest.update(json_line({"data": row.data, "problem": row.problem}).encode())
            yield _Block(index, index * self.block_size, chunk, digest.hexdigest())
            index += 1

    def _name(self, block: _Block, i: int) -> str:
        row_id = block.rows[i].data.get(self.id_column) if self.id_column else None
        return row_name(block.first_row + i, row_id)

    def _problem(self, row: InputRow) -> str | None:
        if row.problem is not None:
            return row.problem
        if self.text_column not in row.data:
            return f"has no {self.text_column!r} field (the text column)"
        text = row.data[self.text_column]
        if not isinstance(text, str):
            shown = repr(text)[:80]
            return f"the {self.text_column!r} field must be a string, got {type(text).__name__} {shown}"
        return None

    def _work(self, block: _Block) -> Work:
        texts, names = [], []
        for i, row in enumerate(block.rows):
            if self._problem(row) is None:
                texts.append(row.data[self.text_column])
                names.append(self._name(block, i))
        return Work(texts, names)

    def _merge(self, block: _Block, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each input row's fields followed by its result (or the error of its problem)."""
        fields = self.spec.fields
        computed = iter(results)
        merged = []
        for i, row in enumerate(block.rows):
            problem = self._problem(row)
            if problem is None:
                result = next(computed)
            else:
                result = dict.fromkeys(fields)
                result[ERROR_FIELD] = f"{self._name(block, i)}: {problem}"
            kept = {k: v for k, v in row.data.items() if k not in fields}
            merged.append({**kept, **result})
        if next(computed, None) is not None:
            raise RuntimeError(f"block {block.index}: more results than rows")
        return merged

    # ------------------------------------------------------------------- files
    def _open_parts(self) -> None:
        job = self.parts / "job.json"
        if job.is_file():
            try:
                earlier = json.loads(job.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                earlier = None
            if earlier != self.settings:
                differ = sorted(
                    k
                    for k in set(self.settings) | set(earlier or {})
                    if not isinstance(earlier, dict) or earlier.get(k) != self.settings.get(k)
                )
                raise InvalidArgumentError(
                    f"{str(self.parts)!r} holds the blocks of a job with other settings "
                    f"(differing: {', '.join(differ)}); run it with the same settings to "
                    "resume it, or delete the folder (or choose another output) to start anew"
                )
            return
        self.parts.mkdir(exist_ok=True)
        _write_atomically(job, json.dumps(self.settings, indent=2).encode())

    def _write_part(self, block: _Block, rows: list[dict[str, Any]]) -> None:
        for stale in self.parts.glob(f"block-{block.index:08d}-*.jsonl"):
            stale.unlink()  # the same block of an earlier, different input
        data = "".join(json_line(row) for row in rows).encode()
        _write_atomically(self.parts / block.file_name, data)

    def _assemble(self, parts: list[Path]) -> None:
        temporary = self.parts / f"output{self.output.suffix}"
        assemble(parts, temporary, self.out_kind)
        os.replace(temporary, self.output)
        shutil.rmtree(self.parts)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def _read_part(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
