"""The Ray Data transform and ``edge-slm batch --workers/--ray`` on one local Ray cluster
(``ray.init(num_cpus=2)``, shared by the whole session): the single-process runtime's
results row for row for every task, and a killed actor's work retried with nothing lost
or repeated. Opt in: ``make test-ray`` (installs the ray extra) or ``pytest -m ray``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_batch_cli import batch, good_rows, read_jsonl, texts, write_jsonl

import edge_slm
from edge_slm.scale.tasks import TaskSpec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """One local cluster of 2 CPUs for the session (Ray's testing guide); its address.

    Without the ray extra this fails (ImportError): a cluster test that skipped would
    read as passed."""
    import ray
    import ray.data

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield str(context.address_info["gcs_address"])
    ray.shutdown()


@pytest.fixture(scope="module")
def ner_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_encoders import build_token_classifier

    from edge_slm_export.encoder import export_encoder

    root = tmp_path_factory.mktemp("ner")
    return export_encoder(str(build_token_classifier("bert", root / "src")), root / "ner")


def task_bundles(
    encoder_bundles: dict[str, Path], bundles: dict[str, Path], ner_bundle: Path
) -> dict[str, tuple[Path, TaskSpec]]:
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    seeded = {"max_new_tokens": 6, "temperature": 0.9, "top_p": 0.9, "seed": 3}
    return {
        "classify": (encoder_bundles["clf"], TaskSpec("classify", batch_size=4, top_k=2)),
        "embed": (encoder_bundles["emb"], TaskSpec("embed", batch_size=4)),
        "ner": (ner_bundle, TaskSpec("ner", aggregation="none")),
        "generate-greedy": (bundles["llama"], TaskSpec("generate", 3, generation=greedy)),
        "generate-seeded": (bundles["qwen2"], TaskSpec("generate", 3, generation=seeded)),
        "chat": (bundles["llama"], TaskSpec("chat", 3, system="Be brief.", generation=greedy)),
    }


def runtime_row(model: Any, spec: TaskSpec, text: str) -> dict[str, Any]:
    """What the public runtime API gives for one text, as the transform's fields."""
    if spec.task == "classify":
        result = model.classify(text, top_k=spec.top_k).to_dict()
    elif spec.task == "embed":
        result = {"embedding": model.embed(text).tolist()}
    elif spec.task == "ner":
        result = model.classify(text, aggregation=spec.aggregation).to_dict()
    else:
        if spec.task == "chat":
            messages = [
                {"role": "system", "content": spec.system},
                {"role": "user", "content": text},
            ]
            generated = model.chat(messages, **spec.generation)
        else:
            generated = model.generate(text, **spec.generation)
        result = {
            "generated_text": generated.text,
            "finish_reason": generated.finish_reason.value,
            "prompt_tokens": len(generated.prompt_token_ids),
            "generated_tokens": len(generated.token_ids),
        }
    return {**result, "error": None}


def same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal, floats to float32 rounding (batches of other lengths pad differently)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key in ("score", "scores", "embedding"):
            assert got[key] == pytest.approx(value, abs=1e-5), key
        elif key == "entities":
            assert [{**e, "score": None} for e in got[key]] == [{**e, "score": None} for e in value]
            assert [e["score"] for e in got[key]] == pytest.approx([e["score"] for e in value])
        else:
            assert got[key] == value, key


@pytest.mark.parametrize(
    "task", ["classify", "embed", "ner", "generate-greedy", "generate-seeded", "chat"]
)
def test_transform_equals_the_runtime_row_for_row(
    cluster: str,
    encoder_bundles: dict[str, Path],
    bundles: dict[str, Path],
    ner_bundle: Path,
    task: str,
) -> None:
    import ray.data

    from edge_slm.scale.ray_data import map_bundle

    bundle, spec = task_bundles(encoder_bundles, bundles, ner_bundle)[task]
    rows = [{"id": i, "text": t} for i, t in enumerate(texts(24))]
    rows[5]["text"] = None  # a bad row: named in its error, the others scored
    ds = ray.data.from_items(rows, override_num_blocks=6)
    out = map_bundle(ds, bundle, spec, workers=2, id_column="id").take_all()
    assert [r["id"] for r in out] == list(range(24))  # order and ids kept
    assert [r["text"] for r in out] == [r["text"] for r in rows]
    assert out[5]["error"] == "row with id 5: the text must be a string, got NoneType None"
    model = edge_slm.load(bundle)  # the single-process runtime, one row at a time
    for row, source in zip(out, rows, strict=True):
        if source["text"] is not None:
            same({k: row[k] for k in spec.fields}, runtime_row(model, spec, source["text"]))


def test_cli_on_ray_writes_what_the_local_path_writes(
    cluster: str, encoder_bundles: dict[str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    rows: list[Any] = good_rows(40)
    rows.insert(3, {"id": "bad", "text": 17})
    rows.insert(9, "{not json")
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--id-column", "id", "--block-size", 7, "--batch-size", 4]
    for name, bundle, extra in (
        ("clf", encoder_bundles["clf"], []),
        ("gen", bundles["llama"], ["--max-new-tokens", 5, "--temperature", 0]),
    ):
        local, on_ray = tmp_path / f"{name}-local.jsonl", tmp_path / f"{name}-ray.jsonl"
        assert batch(bundle, source, local, *common, *extra) == 0
        assert batch(bundle, source, on_ray, *common, *extra, "--workers", 2) == 0
        got, want = read_jsonl(on_ray), read_jsonl(local)
        assert [r.get("id") for r in got] == [r.get("id") for r in want]
        assert got[3]["error"] == "row 4 (id 'bad'): the 'text' field must be a string, got int 17"
        for g, w in zip(got, want, strict=True):
            same(g, w)


def test_cli_parquet_in_and_out_through_ray_address(
    cluster: str, encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(good_rows(30)), source, row_group_size=8)
    out = tmp_path / "out.parquet"
    status = batch(encoder_bundles["emb"], source, out, "--block-size", 9, "--ray", cluster)
    assert status == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "text", "embedding", "error"]
    model = edge_slm.load(encoder_bundles["emb"])
    for row, vector in zip(table.to_pylist(), model.embed(texts(30)), strict=True):
        assert row["embedding"] == pytest.approx(vector.tolist(), abs=1e-6)
    assert table.column("id").to_pylist() == [f"t{i}" for i in range(30)]


def map_worker_pids() -> list[int]:
    """PIDs of the processes running Ray Data's actors (named ray::MapWorker(...))."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    command = fh.read()
            except OSError:
                continue
            if command.startswith(b"ray::MapWorker"):
                pids.append(int(entry))
    return pids


def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_repeated(
    cluster: str, bundles: dict[str, Path]
) -> None:
    import ray.data
    from ray._private import state  # actors' restart counts without the dashboard

    from edge_slm.scale.ray_data import map_bundle

    spec = TaskSpec("generate", generation={"max_new_tokens": 10, "temperature": 0.0})
    rows = [{"id": i, "text": t} for i, t in enumerate(texts(60))]
    ds = ray.data.from_items(rows, override_num_blocks=20)
    scored = map_bundle(ds, bundles["llama"], spec, workers=2, batch_size=3)
    out: list[dict[str, Any]] = []
    killed: list[int] = []
    for piece in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.extend(piece.to_pylist())
        if not killed:  # the first results are back: kill an actor while work remains
            victim = map_worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
    assert len(out) == 60 and [r["id"] for r in out] == list(range(60))  # none lost or repeated
    assert not os.path.exists(f"/proc/{killed[0]}")
    # only this test kills: a restarted map actor is this one
    workers = [a for a in state.actors().values() if a["ActorClassName"].startswith("MapWorker(")]
    assert any(a["NumRestarts"] >= 1 for a in workers)
    model = edge_slm.load(bundles["llama"])
    for row in out:
        want = model.generate(row["text"], max_new_tokens=10, temperature=0.0)
        assert (row["generated_text"], row["finish_reason"]) == (
            want.text,
            want.finish_reason.value,
        )


def test_cli_uploads_the_bundle_with_the_job(
    cluster: str, encoder_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A new driver (a subprocess, exit status checked) joins the session's cluster and
    sends the bundle with its job: the actors load it from their working directory
    (had the upload not happened, '.' there is no bundle and every row would fail)."""
    source = write_jsonl(tmp_path / "in.jsonl", good_rows(12))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "edge_slm.cli.main", "batch", str(encoder_bundles["clf"])]
    command += [str(source), str(out), "--ray", cluster, "--workers", "1", "--upload-bundle"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    model = edge_slm.load(encoder_bundles["clf"])
    got = read_jsonl(out)
    assert [r["label"] for r in got] == [c.label for c in model.classify(texts(12))]
    assert all(r["error"] is None for r in got)
