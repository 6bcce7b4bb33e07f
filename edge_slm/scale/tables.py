"""Rows of JSONL, CSV and Parquet files: read lazily, written from JSON-line parts.

Reading yields :class:`InputRow` objects one by one (the file is never read whole). A
line that is not a JSON object does not stop the job: it becomes a row with a
``problem`` that the job reports in that row's ``error`` field.

Writing takes the job's parts (JSON lines of finished rows, in order) and assembles the
output file: JSONL as it is, CSV with the union of the rows' columns (lists and objects
as JSON text, None as an empty cell), Parquet with the rows' types unified across
parts. Parquet needs pyarrow (``pip install 'edge-slm[ray]'``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_slm.errors import InvalidArgumentError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> format."""

PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class InputRow:
    """One input row: its fields, or why it could not be read (a malformed line)."""

    data: dict[str, Any]
    problem: str | None = None


def file_format(path: Path) -> str:
    """The format of ``path`` from its suffix; InvalidArgumentError for another suffix."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InvalidArgumentError(
            f"{str(path)!r}: unknown file type {path.suffix!r}; allowed suffixes: {sorted(FORMATS)}"
        )
    return kind


def pyarrow_modules() -> tuple[ModuleType, ModuleType]:
    """``(pyarrow, pyarrow.parquet)``, or InvalidArgumentError naming the extra."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InvalidArgumentError(
            "Parquet files need pyarrow: pip install 'edge-slm[ray]' (or pyarrow), or use "
            "JSONL or CSV"
        ) from None
    return pyarrow, pyarrow.parquet


def read_rows(path: Path) -> Iterator[InputRow]:
    """Yield the rows of ``path`` in order (JSONL objects, CSV rows, Parquet rows).

    Raises:
        InvalidArgumentError: the file is missing or of an unknown type.
    """
    kind = file_format(path)
    if not path.exists():
        raise InvalidArgumentError(f"input file {str(path)!r} does not exist")
    if kind == "parquet":
        _, parquet = pyarrow_modules()
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for data in batch.to_pylist():
                yield InputRow(data)
        return
    with open(path, encoding="utf-8", newline="") as fh:
        if kind == "csv":
            for data in csv.DictReader(fh):
                yield InputRow(dict(data))
            return
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputRow({}, f"line {number} is not JSON: {exc}")
                continue
            if isinstance(data, dict):
                yield InputRow(data)
            else:
                yield InputRow({}, f"line {number} is a JSON {type(data).__name__}, not an object")


def json_line(row: dict[str, Any]) -> str:
    """``row`` as one JSON line (values JSON cannot hold, e.g. dates, as their text)."""
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def _part_rows(parts: Sequence[Path]) -> Iterator[list[dict[str, Any]]]:
    for part in parts:
        with open(part, encoding="utf-8") as fh:
            yield [json.loads(line) for line in fh]


def assemble(parts: Sequence[Path], out: Path, kind: str) -> None:
    """Write the rows of ``parts`` (JSON-line files, in order) to ``out`` as ``kind``."""
    if kind == "jsonl":
        with open(out, "wb") as dst:
            for part in parts:
                dst.write(part.read_bytes())
    elif kind == "csv":
        _write_csv(parts, out)
    else:
        _write_parquet(parts, out)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _write_csv(parts: Sequence[Path], out: Path) -> None:
    columns: dict[str, None] = {}  # ordered set: first appearance first
    for rows in _part_rows(parts):
        for row in rows:
            columns.update(dict.fromkeys(row))
    with open(out, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        for rows in _part_rows(parts):
            writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def _write_parquet(parts: Sequence[Path], out: Path) -> None:
    pa, parquet = pyarrow_modules()
    try:
        schemas = [pa.Table.from_pylist(rows).schema for rows in _part_rows(parts) if rows]
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
        with parquet.ParquetWriter(out, schema or pa.schema([])) as writer:
            for rows in _part_rows(parts):
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InvalidArgumentError(
            f"cannot write {str(out)!r} as Parquet: {exc} (a column holds values of "
            "different types; write JSONL instead)"
        ) from None
