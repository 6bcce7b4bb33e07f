"""``edge-slm batch`` without Ray: the results of the runtime row for row, bad rows named,
resuming after a kill or Ctrl-C without redoing finished blocks, and the default
install (no ray, no pyarrow) enough for it."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from isolation import report_of, run_blocked

import edge_slm
from edge_slm.cli.main import main
from edge_slm.scale.blocks import BlockJob, Work, local_engine
from edge_slm.scale.tasks import RowScorer, TaskSpec

WORDS = [
    "good",
    "bad",
    "film",
    "service",
    "great",
    "awful",
    "slow",
    "quick",
    "kind",
    "rude",
    "fine",
    "meh",
    "the",
    "a",
    "was",
    "very",
]
LONG = " ".join(["word"] * 2000)  # over every tiny model's context


def texts(n: int = 45) -> list[str]:
    """Deterministic texts of 1 to 14 words."""
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 15)))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def batch(*args: object) -> int:
    return main(["batch", *map(str, args), "--no-progress"])


def good_rows(n: int = 45) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "text": t} for i, t in enumerate(texts(n))]


def with_bad_rows(rows: list[dict[str, Any]]) -> list[Any]:
    """``rows`` with a number as text (row 4), no text (row 8) and a line that is not JSON
    (row 12) put in between."""
    out: list[Any] = list(rows)
    out.insert(3, {"id": "bad-int", "text": 17})
    out.insert(7, {"id": "bad-missing", "body": "no text field"})
    out.insert(11, "{not json")
    return out


def check_bad_rows(out: list[dict[str, Any]]) -> None:
    assert out[3]["error"] == "row 4 (id 'bad-int'): the 'text' field must be a string, got int 17"
    assert out[7]["error"].startswith("row 8 (id 'bad-missing'): has no 'text' field")
    assert out[11]["error"].startswith("row 12: line 12 is not JSON")


def strip_bad(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for i, row in enumerate(out) if i not in (3, 7, 11)]


def test_classify_equals_the_runtime_row_for_row(
    encoder_bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [*good_rows(), {"id": "long", "text": LONG}]
    source = write_jsonl(tmp_path / "in.jsonl", with_bad_rows(rows))
    assert (
        batch(
            encoder_bundles["clf"],
            source,
            tmp_path / "out.jsonl",
            "--id-column",
            "id",
            "--block-size",
            10,
            "--batch-size",
            4,
        )
        == 0
    )
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(rows) + 3
    check_bad_rows(out)
    kept = strip_bad(out)
    assert [r["id"] for r in kept] == [r["id"] for r in rows]  # order and ids kept
    assert kept[-1]["error"].startswith("row 49 (id 'long'): input 0 has")
    assert "context length" in kept[-1]["error"]
    model = edge_slm.load(encoder_bundles["clf"])
    expected = list(model.classify([r["text"] for r in rows[:-1]], batch_size=4))
    for row, source_row, want in zip(kept[:-1], rows, expected, strict=False):
        assert (row["text"], row["error"]) == (source_row["text"], None)
        assert row["label"] == want.label and row["labels"] == list(want.labels)
        assert row["scores"] == pytest.approx(list(want.scores), abs=1e-5)
    err = capsys.readouterr().err
    assert "edge-slm batch: 49 rows -> " in err and "(49 computed now)" in err
    assert "4 row(s) failed" in err and "row 4 (id 'bad-int')" in err


def test_embed_equals_the_runtime(encoder_bundles: dict[str, Path], tmp_path: Path) -> None:
    rows = good_rows()
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    assert batch(encoder_bundles["emb"], source, tmp_path / "out.jsonl", "--block-size", 16) == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    expected = np.stack(list(edge_slm.load(encoder_bundles["emb"]).embed(texts())))
    got = np.array([row["embedding"] for row in out], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [row["id"] for row in out] == [row["id"] for row in rows]


@pytest.fixture(scope="module")
def ner_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_encoders import build_token_classifier

    from edge_slm_export.encoder import export_encoder

    root = tmp_path_factory.mktemp("ner")
    return export_encoder(str(build_token_classifier("bert", root / "src")), root / "ner")


def test_ner_equals_the_runtime(ner_bundle: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", with_bad_rows(good_rows(20)))
    assert (
        batch(
            ner_bundle,
            source,
            tmp_path / "out.jsonl",
            "--id-column",
            "id",
            "--block-size",
            6,
            "--aggregation",
            "first",
        )
        == 0
    )
    out = read_jsonl(tmp_path / "out.jsonl")
    check_bad_rows(out)
    model = edge_slm.load(ner_bundle)
    expected = model.classify(texts(20), aggregation="first")
    for row, want in zip(strip_bad(out), expected, strict=True):
        assert [(e["entity_group"], e["start"], e["end"]) for e in row["entities"]] == [
            (e.label, e.start, e.end) for e in want.entities
        ]
        assert [e["score"] for e in row["entities"]] == pytest.approx(
            [e.score for e in want.entities], abs=1e-5
        )


GENERATION = {
    "greedy": {"max_new_tokens": 6, "temperature": 0.0},
    "seeded": {"max_new_tokens": 6, "temperature": 0.9, "top_p": 0.9, "seed": 3},
}


@pytest.mark.parametrize("task", ["generate", "chat"])
@pytest.mark.parametrize("mode", sorted(GENERATION))
def test_generation_equals_the_runtime_row_for_row(
    bundles: dict[str, Path], tmp_path: Path, task: str, mode: str
) -> None:
    options = GENERATION[mode]
    rows = good_rows(12)
    source = write_jsonl(
        tmp_path / "in.jsonl", with_bad_rows([*rows, {"id": "long", "text": LONG}])
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert (
        batch(
            bundles["llama"],
            source,
            tmp_path / "out.jsonl",
            "--task",
            task,
            "--id-column",
            "id",
            "--block-size",
            5,
            "--batch-size",
            3,
            *flags,
        )
        == 0
    )
    out = read_jsonl(tmp_path / "out.jsonl")
    check_bad_rows(out)
    kept = strip_bad(out)
    assert kept[-1]["error"].startswith("row 16 (id 'long'): the prompt has")
    model = edge_slm.load(bundles["llama"])
    for row, source_row in zip(kept[:-1], rows, strict=True):
        if task == "chat":
            want = model.chat([{"role": "user", "content": source_row["text"]}], **options)
        else:
            want = model.generate(source_row["text"], **options)
        assert (row["id"], row["text"], row["error"]) == (
            source_row["id"],
            source_row["text"],
            None,
        )
        assert row["generated_text"] == want.text
        assert row["finish_reason"] == want.finish_reason.value
        assert row["prompt_tokens"] == len(want.prompt_token_ids)
        assert row["generated_tokens"] == len(want.token_ids)


def test_csv_in_and_out_with_other_columns(
    encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    with open(source, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ticket", "body", "gold"])
        for i, text in enumerate(texts(9)):
            writer.writerow([f"T-{i}", text, "x"])
    assert (
        batch(
            encoder_bundles["clf"],
            source,
            tmp_path / "out.csv",
            "--text-column",
            "body",
            "--id-column",
            "ticket",
            "--block-size",
            4,
            "--top-k",
            2,
        )
        == 0
    )
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as fh:
        out = list(csv.DictReader(fh))
    assert list(out[0]) == [
        "ticket",
        "body",
        "gold",
        "label",
        "score",
        "labels",
        "scores",
        "truncated",
        "error",
    ]
    expected = list(edge_slm.load(encoder_bundles["clf"]).classify(texts(9), top_k=2))
    for i, (row, want) in enumerate(zip(out, expected, strict=True)):
        assert (row["ticket"], row["gold"], row["error"]) == (f"T-{i}", "x", "")
        assert json.loads(row["labels"]) == list(want.labels)
        assert float(row["score"]) == pytest.approx(want.score, abs=1e-5)


def interrupted_engine(scorer: RowScorer, blocks: int) -> Any:
    """An engine that stops (KeyboardInterrupt) after ``blocks`` blocks."""

    def run(works: Iterator[Work]) -> Iterator[list[dict[str, Any]]]:
        for done, work in enumerate(works):
            if done == blocks:
                raise KeyboardInterrupt
            yield scorer.score(work.texts, work.names)

    return run


def test_resume_recomputes_only_changed_blocks_and_refuses_other_settings(
    encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    rows = good_rows(30)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    spec = TaskSpec("classify")
    scorer = RowScorer(encoder_bundles["clf"], spec)
    job = BlockJob(source, out, encoder_bundles["clf"], spec, block_size=10)
    with pytest.raises(KeyboardInterrupt):
        job.run(interrupted_engine(scorer, 2))
    parts = sorted(p.name for p in (tmp_path / "out.jsonl.parts").iterdir())
    assert len(parts) == 3 and parts[-1] == "job.json" and not out.exists()

    other = BlockJob(source, out, encoder_bundles["clf"], spec, block_size=5)
    with pytest.raises(edge_slm.InvalidArgumentError, match=r"differing: block_size"):
        other.run(local_engine(scorer))

    rows[3]["text"] = "a changed text in block 0"
    write_jsonl(source, rows)
    report = job.run(local_engine(scorer))
    assert (report.rows, report.reused_rows, report.computed_rows) == (30, 10, 20)
    assert not (tmp_path / "out.jsonl.parts").exists()
    got = read_jsonl(out)
    expected = list(scorer.model.classify([r["text"] for r in rows]))  # type: ignore[union-attr]
    assert [r["text"] for r in got] == [r["text"] for r in rows]
    assert [r["label"] for r in got] == [e.label for e in expected]


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "edge_slm.cli.main", "batch", *map(str, args)]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGKILL, -9), (signal.SIGINT, 130)])
def test_resume_after_the_process_is_killed(
    bundles: dict[str, Path], tmp_path: Path, sig: int, status: int
) -> None:
    """The input comes through a named pipe: the test feeds two blocks and a half, waits for
    the two block files, then kills the process while it waits for the rest (no race)."""
    rows = good_rows(25)
    lines = [json.dumps(r) + "\n" for r in rows]
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    options = ["--max-new-tokens", 4, "--temperature", 0, "--block-size", 10, "--id-column", "id"]
    proc = subprocess.Popen(
        cli(bundles["llama"], fifo, out, *options),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    parts = tmp_path / "out.jsonl.parts"
    with open(fifo, "w", encoding="utf-8") as pipe:
        pipe.writelines(lines[:24])
        pipe.flush()
        deadline = time.monotonic() + 60
        while len(list(parts.glob("block-*.jsonl"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert len(list(parts.glob("block-*.jsonl"))) == 2
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    if sig == signal.SIGINT:
        assert "edge-slm: interrupted" in err
    assert not out.exists() and len(list(parts.glob("block-*.jsonl"))) == 2

    os.unlink(fifo)
    fifo.write_text("".join(lines), encoding="utf-8")  # the same rows, now a regular file
    done = subprocess.run(
        cli(bundles["llama"], fifo, out, *options),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "25 rows" in done.stderr
        and "20 of them from an earlier run (5 computed now)" in done.stderr
    )
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # nothing lost or repeated
    model = edge_slm.load(bundles["llama"])
    for row in got:
        want = model.generate(row["text"], max_new_tokens=4, temperature=0.0)
        assert row["generated_text"] == want.text and row["error"] is None
    assert not parts.exists()


def test_usage_errors(
    encoder_bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", good_rows(3))
    clf = encoder_bundles["clf"]
    assert batch(clf, source, tmp_path / "o.jsonl", "--task", "generate") == 2
    assert "text-classification bundle: it runs the task(s) ['classify'], not 'generate'" in (
        capsys.readouterr().err
    )
    assert batch(clf, source, tmp_path / "o.txt") == 2
    assert "allowed suffixes: ['.csv', '.jsonl', '.ndjson', '.parquet']" in capsys.readouterr().err
    assert batch(clf, source, tmp_path / "o.jsonl", "--temperature", 0.5) == 2
    assert "apply to the tasks generate and chat, not 'classify'" in capsys.readouterr().err
    assert batch(clf, source, tmp_path / "o.jsonl", "--block-size", 0) == 2
    assert "block_size must be in [1, 1,000,000], got 0" in capsys.readouterr().err


LOCAL_WITHOUT_RAY = """
import sys
from edge_slm.cli.main import main
REPORT["status"] = main(["batch", BUNDLE, SOURCE, OUT, "--no-progress"])
REPORT["lines"] = len(open(OUT).readlines())
REPORT["parquet"] = main(["batch", BUNDLE, SOURCE, OUT + ".parquet", "--no-progress"])
REPORT["workers"] = main(["batch", BUNDLE, SOURCE, OUT, "--no-progress", "--workers", "2"])
REPORT["loaded"] = sorted(m for m in ("ray", "pyarrow", "pandas") if m in sys.modules)
"""


def test_the_local_path_needs_neither_ray_nor_pyarrow(
    encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", good_rows(5))
    blocked = ("ray", "pyarrow", "pandas", "torch", "transformers", "edge_slm_export")
    out = run_blocked(
        LOCAL_WITHOUT_RAY,
        blocked,
        cwd=tmp_path,
        BUNDLE=str(encoder_bundles["clf"]),
        SOURCE=str(source),
        OUT=str(tmp_path / "out.jsonl"),
    )
    report = report_of(out)
    assert (report["status"], report["lines"], report["parquet"], report["workers"]) == (0, 5, 2, 2)
    assert "Parquet files need pyarrow: pip install 'edge-slm[ray]'" in out.stderr
    assert "error: Ray is not installed (" in out.stderr
    assert "): pip install 'edge-slm[ray]'" in out.stderr
    assert report["loaded"] == [] and report["heavy"] == []
