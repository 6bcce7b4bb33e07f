"""Read texts (and optional labels) from JSONL, CSV or plain-text files, lazily.

Used by ``edge-slm classify/embed --input FILE`` and by the encoder quantizer's
calibration and evaluation files. One record per line (JSONL: an object with ``text``,
optional ``text_pair``, ``label`` or ``labels``), per row (CSV with a header naming the
same columns) or per non-blank line (any other suffix: the line is the text).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_slm.encoders.encoder import TextInput
from edge_slm.errors import InvalidArgumentError

FORMATS = ("jsonl", "csv", "txt")


@dataclass(frozen=True)
class Record:
    """One input text (or pair), its labels if the file has them, and the raw row."""

    text: TextInput
    labels: tuple[str, ...] | None
    row: dict[str, object]


def file_format(path: Path) -> str:
    """``jsonl`` for .jsonl/.json, ``csv`` for .csv/.tsv, ``txt`` otherwise."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "txt"


def _record(row: dict[str, object], where: str) -> Record:
    text = row.get("text")
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{where}: needs a string 'text' field, got {text!r}")
    pair = row.get("text_pair")
    item: TextInput = (text, pair) if isinstance(pair, str) and pair != "" else text
    raw = row.get("labels", row.get("label"))
    labels: tuple[str, ...] | None
    if raw is None or raw == "":
        labels = None
    elif isinstance(raw, list):
        labels = tuple(str(v) for v in raw)
    else:
        labels = (str(raw),)
    return Record(item, labels, row)


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of ``path`` one by one (the file is never read whole).

    Raises:
        InvalidArgumentError: the file is missing, or a line/row has no text.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"input file {str(path)!r} does not exist")
    kind = file_format(path)
    with open(path, encoding="utf-8", newline="") as fh:
        if kind == "jsonl":
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgumentError(f"{path}:{number}: not JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise InvalidArgumentError(f"{path}:{number}: a line must be a JSON object")
                yield _record(row, f"{path}:{number}")
        elif kind == "csv":
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(fh, delimiter=delimiter)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise InvalidArgumentError(
                    f"{path}: the CSV header must name a 'text' column, got {reader.fieldnames}"
                )
            for number, csv_row in enumerate(reader, 2):
                yield _record(dict(csv_row), f"{path}:{number}")
        else:
            for line in fh:
                if line.strip():
                    text = line.rstrip("\n")
                    yield Record(text, None, {"text": text})
