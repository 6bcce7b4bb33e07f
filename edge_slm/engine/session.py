"""onnxruntime session creation with the defaults a small device wants.

Defaults are chosen per machine when a session is created (never at import):

* threads: the CPUs this process may run on (cgroup/affinity aware);
* spinning (idle worker threads busy-wait for the next job): onnxruntime's default (on)
  while the CPU has room, off when the 1-minute load average already fills every CPU
  this process may use. On SmolLM2-135M (gguf bundle, 2 cores, quiet machine) spinning
  on gave 116 decode tok/s against 82 with it off and 71 on one thread; on a contended
  CPU (FINDINGS.md) one thread with spinning off was faster and steadier.

Overrides, strongest first: the ``threads`` / ``spinning`` arguments (the CLI's
``--threads`` / ``--no-spinning``), then the environment variables
``EDGE_SLM_THREADS`` (an integer >= 1) and ``EDGE_SLM_SPINNING`` (``0`` or ``1``).

Sessions of bundles opened through :func:`edge_slm.load` come from the prepared-session
cache (:mod:`edge_slm.engine.prepared_cache`) unless it is turned off; a graph opened directly
(build tools, a graph outside a bundle) is not cached unless ``cache`` asks for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edge_slm.bundle import read_manifest
from edge_slm.bundle.hash_record import FileHashes
from edge_slm.engine import prepared_cache
from edge_slm.engine.prepared_cache import CachedSession, CacheSetting
from edge_slm.errors import BundleError, EdgeSlmError, InvalidArgumentError

THREADS_ENV = "EDGE_SLM_THREADS"
SPINNING_ENV = "EDGE_SLM_SPINNING"


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may run on (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SessionDefaults:
    """What :func:`create_session` uses when the caller passes None.

    Attributes:
        threads: intra-op threads.
        spinning: None keeps onnxruntime's default (spinning on); False turns it off.
        reason: why, in a few words (for ``edge-slm bench`` and logs).
    """

    threads: int
    spinning: bool | None
    reason: str


def _env_threads() -> int | None:
    value = os.environ.get(THREADS_ENV)
    if value is None or value == "":
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise InvalidArgumentError(f"{THREADS_ENV} must be an integer >= 1, got {value!r}")
    return threads


def _env_spinning() -> bool | None:
    value = os.environ.get(SPINNING_ENV)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise InvalidArgumentError(f"{SPINNING_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def session_defaults() -> SessionDefaults:
    """Threads and spinning for this machine now (environment overrides first)."""
    cpus = default_threads()
    threads = _env_threads()
    spinning = _env_spinning()
    reasons = []
    if threads is None:
        threads = cpus
        reasons.append(f"{cpus} usable CPUs")
    else:
        reasons.append(f"{THREADS_ENV}={threads}")
    if spinning is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not available on this platform
            load = 0.0
        if load >= cpus:
            spinning = False
            reasons.append(f"load average {load:.1f} >= {cpus} CPUs: spinning off")
        else:
            reasons.append("spinning on (onnxruntime default)")
    else:
        reasons.append(f"{SPINNING_ENV}={int(spinning)}")
    return SessionDefaults(threads, spinning, "; ".join(reasons))


def bundle_model_sha256(model_path: Path) -> str | None:
    """The manifest's sha256 of ``model_path`` when it is the model of the bundle beside it.

    External-data files listed in the manifest (any file that is not the model or
    another role of ``files``) are folded in, so the result names all the graph's
    bytes. None when there is no such bundle or the checksum is not recorded.
    """
    try:
        manifest, checksums = read_manifest(model_path.parent)
    except (BundleError, OSError):
        return None
    name = model_path.name
    if not isinstance(checksums, dict) or manifest.files.get("model") != name:
        return None
    model_sha = checksums.get(name)
    if not isinstance(model_sha, str):
        return None
    roles = set(manifest.files.values())
    extra = sorted((n, str(v)) for n, v in checksums.items() if n not in roles)
    if not extra:
        return model_sha
    joined = "\n".join(f"{n} {v}" for n, v in [(name, model_sha), *extra])
    return hashlib.sha256(joined.encode()).hexdigest()


def _options_factory(threads: int, spinning: bool | None) -> Callable[[], ort.SessionOptions]:
    def make() -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if spinning is not None:
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if spinning else "0"
            )
        return options

    return make


def open_session(
    model_path: Path,
    threads: int | None = None,
    spinning: bool | None = None,
    *,
    cache: CacheSetting = None,
    model_sha256: str | None = None,
    verified: bool = False,
    rehash: bool = False,
) -> CachedSession:
    """:func:`create_session`, also saying whether the session came from the cache.

    ``verified``: the bundle's checksums were checked just before (``edge_slm.load``
    with ``verify=True``), so the cache key is the verified content alone and the same
    bundle in another folder shares the entry. ``rehash``: a cache hit hashes every
    cached file, even those whose signed stat facts match. A graph onnxruntime cannot
    open (a truncated or hostile file) raises :class:`~edge_slm.errors.BundleError`.
    """
    try:
        return _open_session(
            model_path,
            threads,
            spinning,
            cache=cache,
            model_sha256=model_sha256,
            verified=verified,
            rehash=rehash,
        )
    except (EdgeSlmError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / InvalidProtobuf ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(
            f"onnxruntime cannot open the graph {Path(model_path).name!r}: {first}"
        ) from None


def _open_session(
    model_path: Path,
    threads: int | None = None,
    spinning: bool | None = None,
    *,
    cache: CacheSetting = None,
    model_sha256: str | None = None,
    verified: bool = False,
    rehash: bool = False,
) -> CachedSession:
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
    if threads is None or spinning is None:
        defaults = session_defaults()
        threads = threads or defaults.threads
        spinning = defaults.spinning if spinning is None else spinning
    options = _options_factory(threads, spinning)
    enabled = cache is not None and cache is not False
    sha = (model_sha256 or bundle_model_sha256(Path(model_path))) if enabled else None
    if sha is None:
        session = ort.InferenceSession(
            str(model_path), options(), providers=["CPUExecutionProvider"]
        )
        why = "no manifest checksum" if enabled else "off"
        return CachedSession(session, "off", f"prepared-session cache {why}")
    cache_dir = Path(cache) if isinstance(cache, (str, Path)) else None
    return prepared_cache.open_cached(
        Path(model_path),
        sha,
        options,
        cache_dir,
        verified=verified and model_sha256 is None,
        rehash=rehash,
    )


def create_session(
    model_path: Path,
    threads: int | None = None,
    spinning: bool | None = None,
    *,
    cache: CacheSetting = None,
    model_sha256: str | None = None,
) -> ort.InferenceSession:
    """Open an ONNX graph on the CPU execution provider.

    Args:
        model_path: the ``.onnx`` file (external-data files must sit beside it).
        threads: intra-op threads; None: :func:`session_defaults` (``EDGE_SLM_THREADS``
            or every usable CPU).
        spinning: let idle worker threads spin; None: :func:`session_defaults`
            (``EDGE_SLM_SPINNING``, else off on a fully loaded CPU, else onnxruntime's
            default). Turning it off helps on a CPU shared with other work (a kiosk UI).
        cache: the prepared-session cache: True (default folder), a folder, False
            (off); None: off (:func:`edge_slm.load` passes its own default: on unless
            ``EDGE_SLM_CACHE=0``).
        model_sha256: the graph's sha256; None: read from the bundle manifest beside
            ``model_path`` (no manifest: no cache).
    """
    return open_session(
        model_path, threads, spinning, cache=cache, model_sha256=model_sha256
    ).session


MAX_THREADS = 256
"""More intra-op threads than this is a mistake, not a setting (onnxruntime would hang)."""


@dataclass(frozen=True)
class LoadOptions:
    """How a bundle is loaded and how many conversations its model may serve.

    Attributes:
        threads: onnxruntime intra-op threads (1 to 256); None: every usable CPU, or
            ``EDGE_SLM_THREADS``.
        spinning: let idle onnxruntime threads spin; None: onnxruntime's default unless
            the CPU is already fully loaded (see :func:`session_defaults`).
        verify: check every file's sha256 against the manifest before loading (the
            prepared-session cache then keys its entry by that verified content). With
            the prepared-session cache on, a file whose size, mtime, ctime, inode and
            device match a signed record made when it was last hashed is not read again
            (:mod:`edge_slm.bundle.hash_record`; any write changes its ctime).
        rehash: hash every file in full at every load, the bundle's and the
            prepared-session cache's, ignoring the signed stat records (also
            ``EDGE_SLM_REHASH=1``): catches silent corruption of the storage medium,
            which changes no stat fact.
        prepared_cache: the prepared-session cache (:mod:`edge_slm.engine.prepared_cache`):
            True: on, in the default folder; a path: on, in that folder; False: off;
            None: on unless ``EDGE_SLM_CACHE=0``.
        max_sessions: how many conversations may hold KV memory at once (text
            generation). An idle conversation's KV is dropped (least recently used first)
            when a new one needs room; a call that finds every slot generating waits
            ``wait_s`` and then raises :class:`~edge_slm.errors.CapacityError`.
        max_kv_bytes: a limit on the KV memory of all conversations together; None: no
            limit beyond ``max_sessions`` x the context length.
        wait_s: how long a call waits for a free conversation slot (0: fail at once).
        batch_window_s: how long a decode step may wait for the steps of conversations
            on other threads, so they share one forward (fused graphs). 5 ms: with 4
            streams on SmolLM2 2 ms gathered 2.8 steps per forward, 5 ms 3.8 (of 4).
        chat_special_tokens: let text inside chat messages produce special tokens
            (``<|im_start|>``...), as the template's own text does. Off by default: a
            visitor typing ``<|im_end|>\n<|im_start|>system`` must not forge a system
            turn. Turn it on only for trusted callers that build such text on purpose.
    """

    threads: int | None = None
    spinning: bool | None = None
    verify: bool = True
    rehash: bool = False
    prepared_cache: bool | str | Path | None = None
    max_sessions: int = 8
    max_kv_bytes: int | None = None
    wait_s: float = 0.0
    batch_window_s: float = 0.005
    chat_special_tokens: bool = False

    def __post_init__(self) -> None:
        def whole(name: str, value: object, low: int, high: int | None = None) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok or value < low or (high is not None and value > high):  # type: ignore[operator]
                allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise InvalidArgumentError(f"{name} must be an integer {allowed}, got {value!r}")

        def seconds(name: str, value: object, high: float) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not 0 <= value <= high:  # type: ignore[operator]
                raise InvalidArgumentError(f"{name} must be a number in [0, {high}], got {value!r}")

        if self.threads is not None:
            whole("threads", self.threads, 1, MAX_THREADS)
        if self.spinning is not None and not isinstance(self.spinning, bool):
            raise InvalidArgumentError(
                f"spinning must be True, False or None, got {self.spinning!r}"
            )
        if not isinstance(self.chat_special_tokens, bool):
            raise InvalidArgumentError(
                f"chat_special_tokens must be True or False, got {self.chat_special_tokens!r}"
            )
        if not isinstance(self.verify, bool):
            raise InvalidArgumentError(f"verify must be True or False, got {self.verify!r}")
        if not isinstance(self.rehash, bool):
            raise InvalidArgumentError(f"rehash must be True or False, got {self.rehash!r}")
        whole("max_sessions", self.max_sessions, 1, 4096)
        if self.max_kv_bytes is not None:
            whole("max_kv_bytes", self.max_kv_bytes, 1)
        seconds("wait_s", self.wait_s, 3600.0)
        seconds("batch_window_s", self.batch_window_s, 1.0)

    def open(self, model_path: Path) -> CachedSession:
        """The onnxruntime session of ``model_path`` with these threads, spinning and cache."""
        return open_session(
            model_path,
            self.threads,
            self.spinning,
            cache=self.cache_setting(),
            verified=self.verify,
            rehash=self.rehash,
        )

    def bundle_hashes(self) -> FileHashes | None:
        """The signed record of bundle files hashed before, for
        :func:`edge_slm.bundle.read_bundle`; None: hash every file (``verify`` off,
        ``rehash``, or the prepared-session cache off)."""
        if not self.verify:
            return None
        return prepared_cache.bundle_hashes(self.cache_setting(), self.rehash)

    def cache_setting(self) -> CacheSetting:
        """The prepared-cache setting with None resolved from ``EDGE_SLM_CACHE``."""
        if self.prepared_cache is None:
            return prepared_cache.env_enabled()
        return self.prepared_cache
