"""A bundle as a Ray Data transform: the same rows on a laptop or a cluster.

    >>> import ray
    >>> from edge_slm.scale.ray_data import map_bundle
    >>> from edge_slm.scale.tasks import TaskSpec
    >>> ds = ray.data.read_parquet("s3://bucket/tickets/")
    >>> scored = map_bundle(ds, "/models/ticket-router", TaskSpec("classify"), workers=8)
    >>> scored.write_parquet("s3://bucket/tickets-routed/")

:class:`BundleTransform` is a callable class for ``Dataset.map_batches``: Ray Data runs
it as a pool of actors; each actor loads the bundle once (in ``__init__``) and then
scores batches (pyarrow tables) with :class:`~edge_slm.scale.tasks.RowScorer`, so the
results are those of the single-process runtime, row for row. onnxruntime's intra-op
threads are the CPUs Ray gave the actor (``num_cpus``), so ``workers`` actors on a node
use ``workers * num_cpus`` cores and never oversubscribe it. A bad row gets an
``error`` field naming it; the other rows of its batch are scored as usual. A dead
actor is restarted and its batches retried: Ray Data's defaults for map actors
(``max_restarts=-1``, ``max_task_retries=-1`` in Ray 2.60; tests/test_ray.py kills one).

:func:`ray_engine` is the engine of ``edge-slm batch --workers/--ray``
(:mod:`edge_slm.scale.blocks`).

Needs ``pip install 'edge-slm[ray]'``; nothing else in edge_slm imports this module.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

try:
    import pyarrow as pa
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - depends on the install
    from edge_slm.errors import InvalidArgumentError

    raise InvalidArgumentError(
        f"Ray is not installed ({exc}): pip install 'edge-slm[ray]'"
    ) from None

from edge_slm.errors import InvalidArgumentError
from edge_slm.scale.blocks import Engine, Work
from edge_slm.scale.tasks import ERROR_FIELD, RowScorer, TaskSpec

_ENTITY_GROUP = pa.struct(
    [
        ("entity_group", pa.string()),
        ("score", pa.float64()),
        ("word", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
    ]
)
_ENTITY_TOKEN = pa.struct(
    [
        ("entity", pa.string()),
        ("score", pa.float64()),
        ("index", pa.int64()),
        ("word", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
    ]
)

RESULT_TYPES: dict[str, pa.DataType] = {
    "label": pa.string(),
    "score": pa.float64(),
    "labels": pa.list_(pa.string()),
    "scores": pa.list_(pa.float64()),
    "truncated": pa.bool_(),
    "embedding": pa.list_(pa.float32()),  # the graph's float32 values, exactly
    "generated_text": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int64(),
    "generated_tokens": pa.int64(),
    ERROR_FIELD: pa.string(),
}
"""Arrow type of each result field (the same in every batch, so blocks concatenate);
``entities`` (ner) depends on the aggregation: see :func:`result_type`."""


def result_type(spec: TaskSpec, name: str) -> pa.DataType:
    """The Arrow type of result field ``name`` under ``spec``."""
    if name == "entities":
        entity = _ENTITY_TOKEN if spec.aggregation == "none" else _ENTITY_GROUP
        return pa.list_(entity)
    return RESULT_TYPES[name]


TEXT_COLUMN = "__edge_slm_text"
NAME_COLUMN = "__edge_slm_name"
"""The columns :func:`ray_engine` ships: each row's text, and how errors name it."""

WAVE_BLOCKS_PER_WORKER = 16
"""ray_engine: blocks sent to the cluster at once, per worker (one Ray Data run each)."""


def actor_cpus() -> int:
    """The CPUs Ray assigned to this worker (at least 1); 1 outside a Ray worker."""
    context: Any = ray.get_runtime_context()
    assigned = float(context.get_assigned_resources().get("CPU", 1.0))
    return max(1, math.floor(assigned))


def _spec(spec: TaskSpec | Mapping[str, Any]) -> TaskSpec:
    return spec if isinstance(spec, TaskSpec) else TaskSpec(**spec)


class BundleTransform:
    """A callable class for ``Dataset.map_batches(..., batch_format="pyarrow")``.

    Args:
        bundle: the bundle folder, readable at this path on every node (a shared file
            system, or copied there beforehand: docs/scale-out.md).
        spec: what to compute (a :class:`TaskSpec` or its ``to_dict()``).
        text_column: the column holding the texts.
        id_column: a column naming rows in errors ("row with id 'a17'").
        name_column: a column whose values name rows in errors as they are (wins over
            ``id_column``; :func:`ray_engine` uses it).
        threads: onnxruntime threads; None: the CPUs Ray gave this actor.

    Each output batch is the input batch with the result columns (:data:`RESULT_TYPES`)
    appended (types: :func:`result_type`), replacing input columns of the same names.
    """

    def __init__(
        self,
        bundle: str | Path,
        spec: TaskSpec | Mapping[str, Any],
        text_column: str = "text",
        id_column: str | None = None,
        name_column: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.spec = _spec(spec)
        self.text_column, self.id_column, self.name_column = text_column, id_column, name_column
        self.scorer = RowScorer(bundle, self.spec, threads=threads or actor_cpus())

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score one batch; rows keep their order and every input column."""
        n = batch.num_rows
        if self.text_column in batch.column_names:
            texts: list[object] = batch.column(self.text_column).to_pylist()
        else:
            texts = [None] * n
        results = self.scorer.score(texts, self._names(batch))
        out = batch
        for name in self.spec.fields:
            if name in out.column_names:
                out = out.drop_columns([name])
            values = [result[name] for result in results]
            out = out.append_column(name, pa.array(values, type=result_type(self.spec, name)))
        return out

    def _names(self, batch: pa.Table) -> list[str]:
        if self.name_column is not None:
            return [str(v) for v in batch.column(self.name_column).to_pylist()]
        if self.id_column is not None and self.id_column in batch.column_names:
            return [f"row with id {v!r}" for v in batch.column(self.id_column).to_pylist()]
        return [f"row {i + 1} of a batch of {batch.num_rows}" for i in range(batch.num_rows)]


def map_bundle(
    ds: ray.data.Dataset,
    bundle: str | Path,
    spec: TaskSpec | Mapping[str, Any],
    *,
    workers: int | tuple[int, int] = 1,
    cpus_per_worker: int = 1,
    text_column: str = "text",
    id_column: str | None = None,
    name_column: str | None = None,
    batch_size: int | None = None,
) -> ray.data.Dataset:
    """``ds`` with the bundle's results appended to each row (lazy, like every map).

    Args:
        ds: the rows; ``text_column`` holds the texts.
        bundle, spec, text_column, id_column, name_column: as in :class:`BundleTransform`.
        workers: actors (each loads the bundle once), or ``(min, max)`` to autoscale.
        cpus_per_worker: CPUs Ray reserves per actor, and its onnxruntime threads.
        batch_size: rows per call of the transform (None: a whole block per call; the
            scorer still runs the graph ``spec.batch_size`` rows at a time).
    """
    if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, int):
        raise InvalidArgumentError(f"cpus_per_worker must be an integer, got {cpus_per_worker!r}")
    if cpus_per_worker < 1:
        raise InvalidArgumentError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
    checked = _spec(spec)  # a bad spec fails here, not in every actor
    return ds.map_batches(
        BundleTransform,
        fn_constructor_kwargs={
            "bundle": str(bundle),
            "spec": checked.to_dict(),
            "text_column": text_column,
            "id_column": id_column,
            "name_column": name_column,
            "threads": cpus_per_worker,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=_pool(workers),
        num_cpus=cpus_per_worker,
    )


def _pool(workers: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    """A fixed pool of ``workers`` actors, or one autoscaling between ``(min, max)``."""
    if isinstance(workers, tuple):
        low, high = workers
        if not 1 <= low <= high:
            raise InvalidArgumentError(
                f"workers (min, max) must have 1 <= min <= max, got {workers}"
            )
        return ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError(f"workers must be an integer >= 1, got {workers!r}")
    return ray.data.ActorPoolStrategy(size=workers)


def connect(
    address: str | None, workers: int, cpus_per_worker: int, upload: Path | None = None
) -> None:
    """Join the cluster at ``address``, or start a local one sized for the workers.

    A local cluster gets ``workers * cpus_per_worker`` CPUs (as Ray's testing guide
    advises: ``ray.init(num_cpus=...)``, never the machine's count). ``upload``: a
    folder sent with the job (Ray's ``runtime_env`` ``working_dir``, zipped, at most
    512 MiB): every worker starts in its own copy. Does nothing when this process is
    already connected (then ``upload`` is refused: a job's files are fixed at connect).
    """
    if ray.is_initialized():
        if upload is not None:
            raise InvalidArgumentError(
                "cannot upload the bundle: this process is already connected to Ray; pass "
                "runtime_env={'working_dir': BUNDLE} to ray.init and the bundle as '.'"
            )
        return
    settings: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if upload is not None:
        settings["runtime_env"] = {"working_dir": str(upload)}
    if address is None:
        ray.init(num_cpus=workers * cpus_per_worker, **settings)
    else:
        ray.init(address=address, **settings)


def ray_engine(
    bundle: Path,
    spec: TaskSpec,
    *,
    workers: int | None,
    cpus_per_worker: int = 1,
    address: str | None = None,
    upload_bundle: bool = False,
) -> Engine:
    """An engine (:mod:`edge_slm.scale.blocks`) running the blocks on Ray Data.

    ``workers`` actors of ``cpus_per_worker`` CPUs each; None (with an ``address``):
    as many as the cluster's CPUs hold.

    The driver reads the blocks and sends them in waves of
    ``WAVE_BLOCKS_PER_WORKER * workers`` blocks: each wave is one Ray Data run (one
    Ray block per job block, scored by ``workers`` actors) whose results come back in
    order. Every result is checked against the row it belongs to, so a lost or
    duplicated row stops the job instead of shifting the output. With
    ``upload_bundle`` the bundle travels with the job (see :func:`connect`) and each
    actor loads its own copy; otherwise ``bundle`` must be readable at the same path on
    every node.
    """
    for name, value in (("workers", workers or 1), ("cpus_per_worker", cpus_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    if workers is None and address is None:
        raise InvalidArgumentError("give workers, or the address of a cluster to fill")

    def run(works: Iterator[Work]) -> Iterator[list[dict[str, Any]]]:
        connect(address, workers or 1, cpus_per_worker, bundle if upload_bundle else None)
        actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_worker)
        # an uploaded bundle is each worker's working directory
        where = Path(".") if upload_bundle else bundle
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress, not Ray's
        while wave := list(islice(works, WAVE_BLOCKS_PER_WORKER * actors)):
            yield from _run_wave(wave, where, spec, actors, cpus_per_worker)

    return run


def _run_wave(
    wave: list[Work], bundle: Path, spec: TaskSpec, workers: int, cpus_per_worker: int
) -> Iterator[list[dict[str, Any]]]:
    """Score one wave; yield each work item's results as soon as they are all back."""
    pending = deque(wave)
    returned: list[dict[str, Any]] = []

    def finished() -> Iterator[list[dict[str, Any]]]:
        while pending and len(returned) >= len(pending[0].texts):
            work = pending.popleft()
            results = returned[: len(work.texts)]
            del returned[: len(work.texts)]
            names = [r[NAME_COLUMN] for r in results]
            if names != work.names:
                raise RuntimeError(
                    "Ray returned rows out of order, lost or duplicated: expected "
                    f"{work.names[:3]}..., got {names[:3]}..."
                )
            yield [{k: r[k] for k in spec.fields} for r in results]

    tables = [pa.table({TEXT_COLUMN: w.texts, NAME_COLUMN: w.names}) for w in wave if w.texts]
    if tables:
        ds = map_bundle(
            ray.data.from_arrow(tables),
            bundle,
            spec,
            workers=min(workers, len(tables)),
            cpus_per_worker=cpus_per_worker,
            text_column=TEXT_COLUMN,
            name_column=NAME_COLUMN,
        )
        batches: Iterator[Any] = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        for batch in batches:
            returned.extend(batch.to_pylist())
            yield from finished()
    yield from finished()
    if pending or returned:
        raise RuntimeError(
            f"Ray returned {len(returned)} row(s) too many or {len(pending)} block(s) too few"
        )
