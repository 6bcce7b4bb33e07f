"""What a batch job computes per row, and the loaded bundle that computes it.

:class:`TaskSpec` is plain data (picklable, JSON-ready: it is shipped to Ray actors and
recorded in a job's ``job.json``). :class:`RowScorer` loads the bundle once and turns a
list of texts into one result dict per row with the task's fields and an ``error``
field: None for a good row, or a message naming the row. A bad row (not a string, too
long for the model, invalid Unicode) never loses the others: a batch that fails with an
:class:`~edge_slm.errors.EdgeSlmError` is run again row by row and only the rows that
fail again get an error. Other exceptions (a broken bundle, a bug) still fail the call.

Results per task (besides ``error``):

* ``classify``: ``label``, ``score``, ``labels``, ``scores``, ``truncated``
  (as :meth:`~edge_slm.Classification.to_dict`);
* ``embed``: ``embedding`` (the vector as a list of floats);
* ``ner``: ``entities`` (dicts as :meth:`~edge_slm.encoders.entities.Entity.to_dict`:
  ``entity_group``, ``score``, ``word``, ``start``, ``end``; ``entity`` and ``index``
  instead of ``entity_group`` with aggregation "none"), ``truncated``;
* ``generate`` (the text is the prompt) and ``chat`` (the text is the user message,
  rendered in the bundle's chat template): ``generated_text``, ``finish_reason``,
  ``prompt_tokens``, ``generated_tokens``. Greedy (``temperature`` 0) or seeded
  sampling gives each row the tokens it gets alone, whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_slm import load
from edge_slm.encoders.classify import TextClassifier
from edge_slm.encoders.embed import TextEmbedder
from edge_slm.encoders.encoder import MAX_BATCH_SIZE, check_positive, check_truncation
from edge_slm.encoders.entities import check_aggregation
from edge_slm.encoders.token_classify import DEFAULT_AGGREGATION, TokenClassifier
from edge_slm.errors import EdgeSlmError, InvalidArgumentError
from edge_slm.generation.model import TextGenerator
from edge_slm.generation.options import GenerationOptions
from edge_slm.generation.results import GenerationResult

TASKS = ("classify", "embed", "ner", "generate", "chat")
"""The tasks a batch job can run."""

BUNDLE_TASKS = {
    "text-classification": ("classify",),
    "feature-extraction": ("embed",),
    "token-classification": ("ner",),
    "text-generation": ("generate", "chat"),
}
"""Bundle task (manifest) -> the batch tasks it can run, the default first."""

RESULT_FIELDS: dict[str, tuple[str, ...]] = {
    "classify": ("label", "score", "labels", "scores", "truncated"),
    "embed": ("embedding",),
    "ner": ("entities", "truncated"),
    "generate": ("generated_text", "finish_reason", "prompt_tokens", "generated_tokens"),
    "chat": ("generated_text", "finish_reason", "prompt_tokens", "generated_tokens"),
}
"""Task -> the fields each result row gets, in output order (``error`` comes last)."""

ERROR_FIELD = "error"


@dataclass(frozen=True)
class TaskSpec:
    """What to compute for each row.

    Attributes:
        task: one of :data:`TASKS`.
        batch_size: texts per graph run (classify, embed) or rows generated together.
        truncation: texts over the context length (classify, embed): "error" (the row
            gets an error), "warn" or "silent" (cut); None: the runtime's default for
            the task ("error" for classify, "warn" for embed).
        top_k: labels per row (classify); None: the runtime's default.
        threshold: keep labels with probability >= threshold (classify).
        aggregation: how tokens group into entities (ner): "none", "simple", "first",
            "average" or "max"; None: the runtime's default ("simple").
        stride: tag long texts whole in overlapping windows (ner; see
            :meth:`~edge_slm.TokenClassifier.classify`).
        system: a system message for ``chat``.
        generation: generation options by name (``max_new_tokens``, ``temperature``,
            ``top_p``, ``seed``, ...: :class:`~edge_slm.GenerationOptions`).
    """

    task: str
    batch_size: int = 32
    truncation: str | None = None
    top_k: int | None = None
    threshold: float | None = None
    aggregation: str | None = None
    stride: int | None = None
    system: str | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InvalidArgumentError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        check_positive("batch_size", self.batch_size, MAX_BATCH_SIZE)
        if self.truncation is not None:
            check_truncation(self.truncation)
        if self.generation and self.task not in ("generate", "chat"):
            raise InvalidArgumentError(
                f"generation options {sorted(self.generation)} apply to the tasks generate "
                f"and chat, not {self.task!r}"
            )
        GenerationOptions.build(None, self.generation)  # unknown names fail here
        generative = self.task in ("generate", "chat")
        if generative and self.truncation is not None:
            raise InvalidArgumentError(
                "truncation applies to the tasks classify and embed; for generate and chat "
                "use the generation option truncate_prompt"
            )
        if self.system is not None and self.task != "chat":
            raise InvalidArgumentError(
                f"a system message applies to the task chat, not {self.task!r}"
            )
        if self.task != "ner" and (self.aggregation is not None or self.stride is not None):
            raise InvalidArgumentError(
                f"aggregation and stride apply to the task ner, not {self.task!r}"
            )
        if self.aggregation is not None:
            check_aggregation(self.aggregation)
        if self.task != "classify" and (self.top_k is not None or self.threshold is not None):
            raise InvalidArgumentError(
                f"top_k and threshold apply to the task classify, not {self.task!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (recorded in a job's ``job.json``)."""
        data = asdict(self)
        data["generation"] = dict(self.generation)
        return data

    @property
    def fields(self) -> tuple[str, ...]:
        """The result fields of this task, ``error`` last."""
        return (*RESULT_FIELDS[self.task], ERROR_FIELD)


def row_name(index: int, row_id: object = None) -> str:
    """How errors name a row: ``row 7`` (1-based, in input order) and its id if any."""
    return f"row {index + 1}" + ("" if row_id is None else f" (id {row_id!r})")


class RowScorer:
    """One loaded bundle computing a :class:`TaskSpec` for lists of texts.

    Args:
        bundle: the bundle folder.
        spec: what to compute.
        threads: onnxruntime intra-op threads (None: every CPU this process may use;
            a Ray actor passes the CPUs it was given).

    Raises:
        BundleError: the bundle is invalid.
        InvalidArgumentError: the bundle cannot run ``spec.task`` (the message names the
            tasks it can run), or a generation option is invalid.
    """

    def __init__(self, bundle: str | Path, spec: TaskSpec, threads: int | None = None) -> None:
        self.spec = spec
        self.model = load(bundle, threads=threads)
        kind = self.model.manifest.task
        allowed = BUNDLE_TASKS.get(kind, ())
        if spec.task not in allowed:
            runs = f"it runs the task(s) {list(allowed)}" if allowed else "no batch task runs it"
            raise InvalidArgumentError(
                f"bundle {str(bundle)!r} is a {kind} bundle: {runs}, not {spec.task!r}"
            )
        self._options: GenerationOptions | None = None
        if isinstance(self.model, TextGenerator):
            self._options = GenerationOptions.build(None, spec.generation)
            self.model.decode_config(self._options)  # validate once, before any row

    def score(
        self, texts: Sequence[object], names: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """One result dict per text, in order (see the module docstring).

        Args:
            texts: the rows' texts; anything but a str gives that row an error.
            names: how errors name each row (default: :func:`row_name` of its position).
        """
        names = names if names is not None else [row_name(i) for i in range(len(texts))]
        results: list[dict[str, Any] | None] = [None] * len(texts)
        good: list[int] = []
        for i, text in enumerate(texts):
            if isinstance(text, str):
                good.append(i)
            else:
                message = f"the text must be a string, got {type(text).__name__} {text!r}"
                results[i] = self._error(names[i], message)
        if good:
            try:
                computed = self._run([str(texts[i]) for i in good])
            except EdgeSlmError:  # some row is bad: find it, keep the others
                computed = [self._one(str(texts[i]), names[i]) for i in good]
            for i, result in zip(good, computed, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _one(self, text: str, name: str) -> dict[str, Any]:
        try:
            return self._run([text])[0]
        except EdgeSlmError as exc:
            return self._error(name, str(exc))

    def _error(self, name: str, message: str) -> dict[str, Any]:
        result: dict[str, Any] = dict.fromkeys(self.spec.fields)
        result[ERROR_FIELD] = f"{name}: {message}"
        return result

    def _run(self, texts: list[str]) -> list[dict[str, Any]]:
        spec, model = self.spec, self.model
        if isinstance(model, TextClassifier):
            found = model.classify(
                texts,
                top_k=spec.top_k,
                threshold=spec.threshold,
                batch_size=spec.batch_size,
                truncation=check_truncation(spec.truncation or "error"),
            )
            return [{**r.to_dict(), ERROR_FIELD: None} for r in found]
        if isinstance(model, TokenClassifier):
            tagged = model.classify(
                texts,
                aggregation=check_aggregation(spec.aggregation or DEFAULT_AGGREGATION),
                batch_size=spec.batch_size,
                truncation=check_truncation(spec.truncation or "error"),
                stride=spec.stride,
            )
            return [{**r.to_dict(), ERROR_FIELD: None} for r in tagged]
        if isinstance(model, TextEmbedder):
            vectors = model.embed(
                texts,
                batch_size=spec.batch_size,
                truncation=check_truncation(spec.truncation or "warn"),
            )
            return [
                {"embedding": [float(v) for v in vector], ERROR_FIELD: None} for vector in vectors
            ]
        assert isinstance(model, TextGenerator) and self._options is not None
        if spec.task == "chat":
            results = [model.chat(self._messages(text), self._options) for text in texts]
        else:
            results = []
            for start in range(0, len(texts), spec.batch_size):
                part = texts[start : start + spec.batch_size]
                results.extend(model.generate_batch(part, self._options))
        return [_generation(r) for r in results]

    def _messages(self, text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.spec.system}] if self.spec.system else []
        return [*system, {"role": "user", "content": text}]


def _generation(result: GenerationResult) -> dict[str, Any]:
    return {
        "generated_text": result.text,
        "finish_reason": result.finish_reason.value,
        "prompt_tokens": len(result.prompt_token_ids),
        "generated_tokens": len(result.token_ids),
        ERROR_FIELD: None,
    }
