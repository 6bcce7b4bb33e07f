"""HTTP: routing, authentication, body limits and the OpenAI endpoints.

The standard library's ``ThreadingHTTPServer``: one thread per connection (bounded by
``max_connections``), HTTP/1.1 keep-alive, and each request's generations on their own
threads (:mod:`edge_slm.server.generation`), which the runtime batches together.
docs/server.md says why this stack and what each endpoint accepts.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import edge_slm
from edge_slm.errors import EdgeSlmError
from edge_slm.generation.tools import ToolUse
from edge_slm.server import responses, static
from edge_slm.server.config import DEFAULT_MAX_LIVE, ServerConfig
from edge_slm.server.errors import ApiError, bad_request, busy, from_runtime_error
from edge_slm.server.generation import Run
from edge_slm.server.limits import Admission, model_capacity
from edge_slm.server.metrics import Gauge, Metrics
from edge_slm.server.openai_schema import (
    CompletionRequest,
    EncoderRequest,
    parse_classifications,
    parse_completion,
    parse_embeddings,
    require_object,
)
from edge_slm.server.registry import (
    CLASSIFICATION,
    EMBEDDING,
    GENERATION,
    TOKEN_CLASSIFICATION,
    Registry,
    ServedModel,
)
from edge_slm.server.sse import DONE, ChunkedWriter, ClientGone, client_gone, event, json_bytes

CLIENT_CLOSED = 499
"""Status recorded in the metrics for a request whose client went away (nginx's code)."""

API_ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
    "/v1/classifications": "POST",
    "/v1/models": "GET",
}


class App:
    """Everything the request handlers share: settings, models, limits, metrics."""

    def __init__(self, config: ServerConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.metrics = Metrics()
        self.admission = Admission(config.max_live or DEFAULT_MAX_LIVE, config.max_queue)
        self.shutting_down = threading.Event()

    def models_loaded(self, models: list[ServedModel]) -> None:
        """Once loaded: without --max-live, run as many generations as the generator
        holds conversations (its ``max_sessions``)."""
        if self.config.max_live is not None:
            return
        for served in models:
            capacity = model_capacity(served.model) if served.task == GENERATION else None
            if capacity is not None and capacity.max_sessions is not None:
                self.admission.max_live = max(1, capacity.max_sessions)
                return

    def gauges(self) -> list[Gauge]:
        """Gauges read at scrape time: queue, slots, and each model's capacity."""
        out: list[Gauge] = [
            (
                "edge_slm_queue_depth",
                "Requests waiting for a generation slot.",
                (),
                self.admission.waiting,
            ),
            (
                "edge_slm_generations_live",
                "Generations running (slots in use).",
                (),
                self.admission.live,
            ),
            (
                "edge_slm_generations_max",
                "Generation slots (--max-live).",
                (),
                self.admission.max_live,
            ),
            (
                "edge_slm_ready",
                "1 once every bundle is loaded.",
                (),
                1 if self.registry.state == "ready" else 0,
            ),
        ]
        for served in self.registry.models:
            capacity = model_capacity(served.model)
            if capacity is None:
                continue
            labels = (("model", served.id),)
            out.append(
                (
                    "edge_slm_live_sessions",
                    "Conversations holding KV memory.",
                    labels,
                    capacity.live_sessions,
                )
            )
            out.append(
                ("edge_slm_kv_cache_bytes", "KV cache memory in use.", labels, capacity.kv_bytes)
            )
            out.append(
                (
                    "edge_slm_sessions_generating",
                    "Conversations in a generation call right now.",
                    labels,
                    capacity.generating,
                )
            )
            out.append(
                (
                    "edge_slm_sessions_waiting",
                    "Calls waiting in the runtime for a free conversation slot.",
                    labels,
                    capacity.waiting,
                )
            )
            out.append(
                (
                    "edge_slm_batched_forwards",
                    "Forwards run by the runtime's step scheduler (monotonic).",
                    labels,
                    capacity.batches,
                )
            )
            out.append(
                (
                    "edge_slm_batched_decode_steps",
                    "Decode steps those forwards carried (divided by forwards: mean batch).",
                    labels,
                    capacity.batched_steps,
                )
            )
            if capacity.max_sessions is not None:
                out.append(
                    (
                        "edge_slm_max_sessions",
                        "The model's conversation limit.",
                        labels,
                        capacity.max_sessions,
                    )
                )
            if capacity.max_kv_bytes is not None:
                out.append(
                    (
                        "edge_slm_kv_cache_bytes_max",
                        "The model's KV memory limit.",
                        labels,
                        capacity.max_kv_bytes,
                    )
                )
        return out


class EdgeSlmServer(ThreadingHTTPServer):
    """A threading HTTP server with a bounded number of connection threads."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, app: App) -> None:
        self.app = app
        self._connection_slots = threading.BoundedSemaphore(app.config.max_connections)
        super().__init__((app.config.host, app.config.port), Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connection_slots.acquire(blocking=False):
            _refuse_connection(request)
            self.app.metrics.count_request("connection", 503)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's unexpected error: one line in the log, never a crash."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        print(
            f"edge-slm serve: error on a connection from {client_address[0]}: {exc!r}",
            file=sys.stderr,
        )


MAX_JSON_DEPTH = 64
"""Nesting depth of a request body's JSON beyond which it is refused (400)."""


def _refuse_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and Infinity are not JSON."""
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def _json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _refuse_connection(request: socket.socket) -> None:
    body = json.dumps(
        busy("too many open connections; retry later", 503, "too_many_connections").body()
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        request.settimeout(1.0)
        request.sendall(head + body)
    except OSError:
        pass


class Handler(BaseHTTPRequestHandler):
    """One connection: requests one after another (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = f"edge-slm/{edge_slm.__version__}"
    # TCP_NODELAY: a streamed token is one small write; with Nagle's algorithm it waits
    # for the ACK of the previous one (delayed up to 40 ms by the client), so tokens
    # arrived in bursts and the first one late.
    disable_nagle_algorithm = True
    server: EdgeSlmServer

    def setup(self) -> None:
        super().setup()
        # Keep-alive idle limit and write timeout (StreamRequestHandler.timeout, per connection).
        self.connection.settimeout(self.server.app.config.idle_timeout_s)

    # ------------------------------------------------------------------ plumbing
    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:
        if not self.app.config.quiet:
            sys.stderr.write(f"edge-slm serve: {self.address_string()} {format % args}\n")

    def _cors(self) -> dict[str, str]:
        origin = self.app.config.cors_origin
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        head_only: bool = False,
    ) -> int:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in {**self._cors(), **(headers or {})}.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not head_only:
                self.wfile.write(body)
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None
        return status

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> int:
        body = json_bytes(payload)
        return self._send(status, body, "application/json", headers)

    def _send_api_error(self, error: ApiError) -> int:
        return self._send_json(error.status, error.body(), error.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (bad request line, headers too long) as JSON."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        with contextlib.suppress(ClientGone):
            self._send_api_error(ApiError(code, text, "invalid_request_error"))

    def _client_gone(self) -> bool:
        return client_gone(self.connection)

    # ------------------------------------------------------------------ methods
    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_OPTIONS(self) -> None:
        headers = {"Allow": "GET, HEAD, POST, OPTIONS"}
        if self.app.config.cors_origin:
            headers.update(
                {
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                }
            )
        self._discard_body()
        self._send(204, b"", "text/plain", headers)
        self.app.metrics.count_request("options", 204)

    def _method_not_allowed(self) -> None:
        self._discard_body()
        self._send_api_error(ApiError(405, f"method {self.command} is not allowed here"))
        self.app.metrics.count_request("other", 405)

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    # ------------------------------------------------------------------ routing
    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        started = time.perf_counter()
        if path == "/health" and method in ("GET", "HEAD"):
            self._health(method == "HEAD")
            return
        if path == "/metrics" or path.startswith("/v1/"):
            endpoint = path if path in API_ROUTES or path == "/metrics" else "/v1/models/:id"
            if not path.startswith("/v1/models/") and path not in API_ROUTES and path != "/metrics":
                endpoint = "other"
            self._api(endpoint, path, method, started)
            return
        if method in ("GET", "HEAD") and self.app.config.static_dir is not None:
            self._static(path, method == "HEAD")
            return
        self._discard_body()
        status = self._send_api_error(ApiError(404, f"no such path: {path}", code="not_found"))
        self.app.metrics.count_request("other", status)

    def _health(self, head_only: bool) -> None:
        registry = self.app.registry
        if registry.state == "ready":
            status, payload, headers = 200, {"status": "ok"}, {}
        elif registry.state == "loading":
            status, payload, headers = 503, {"status": "loading"}, {"Retry-After": "1"}
        else:
            status, headers = 503, {}
            payload = {"status": "error", "message": registry.error or "load failed"}
        body = json.dumps(payload).encode()
        self._send(status, body, "application/json", headers, head_only)
        self.app.metrics.count_request("/health", status)

    def _static(self, path: str, head_only: bool) -> None:
        root = self.app.config.static_dir
        assert root is not None
        target = static.resolve(root, path)
        if target is None:
            status = self._send_api_error(ApiError(404, f"no such file: {path}", code="not_found"))
        else:
            status = self._send(
                200,
                target.read_bytes(),
                static.content_type(target),
                {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
                head_only,
            )
        self.app.metrics.count_request("static", status)

    def _api(self, endpoint: str, path: str, method: str, started: float) -> None:
        metrics = self.app.metrics
        tracked = endpoint != "/metrics"  # a scrape does not count itself as in flight
        if tracked:
            metrics.request_started()
        status = 500
        self._body_read = False
        try:
            try:
                self._check_auth()
                status = self._dispatch(path, method, started)
            except ApiError as error:
                if not self._body_read:
                    self.close_connection = True  # the unread body would be the next request
                status = self._send_api_error(error)
            except EdgeSlmError as exc:
                status = self._send_api_error(from_runtime_error(exc))
            except ClientGone:
                raise
            except Exception:
                print("edge-slm serve: internal error:\n" + traceback.format_exc(), file=sys.stderr)
                self.close_connection = True
                status = self._send_api_error(
                    ApiError(500, "internal server error (see the server's log)", "server_error")
                )
        except ClientGone:
            self.close_connection = True
            status = CLIENT_CLOSED
        finally:
            if tracked:
                metrics.request_finished(endpoint, status)
            else:
                metrics.count_request(endpoint, status)

    def _check_auth(self) -> None:
        key = self.app.config.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise ApiError(
                401,
                "missing or incorrect API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _dispatch(self, path: str, method: str, started: float) -> int:
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                raise ApiError(405, f"{path} takes GET")
            self._discard_body()
            text = self.app.metrics.render(self.app.gauges())
            return self._send(
                200,
                text.encode(),
                "text/plain; version=0.0.4; charset=utf-8",
                head_only=method == "HEAD",
            )
        if path.startswith("/v1/models"):
            if method not in ("GET", "HEAD"):
                raise ApiError(405, f"{path} takes GET")
            self._discard_body()
            return self._models(path)
        wanted = API_ROUTES.get(path)
        if wanted is None:
            raise ApiError(404, f"no such endpoint: {path}", code="not_found")
        if method != wanted:
            raise ApiError(405, f"{path} takes {wanted}")
        body = require_object(self._read_json())
        handlers: dict[str, Callable[[dict[str, Any], float], int]] = {
            "/v1/chat/completions": lambda b, t: self._completions(b, t, chat=True),
            "/v1/completions": lambda b, t: self._completions(b, t, chat=False),
            "/v1/embeddings": self._embeddings,
            "/v1/classifications": self._classifications,
        }
        return handlers[path](body, started)

    # ------------------------------------------------------------------ bodies
    def _discard_body(self) -> None:
        """Read and drop a small body so the connection stays usable (else close it)."""
        self._body_read = True
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
        elif length:
            try:
                n = int(length)
            except ValueError:
                self.close_connection = True
                return
            if 0 < n <= self.app.config.max_body_bytes:
                self.rfile.read(n)
            elif n:
                self.close_connection = True

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a request body needs a Content-Length header")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise ApiError(400, f"bad Content-Length {length!r}")
        limit = self.app.config.max_body_bytes
        if n > limit:
            raise ApiError(
                413,
                f"the request body has {n} bytes, more than the {limit} allowed",
                code="request_too_large",
            )
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) < n:
            raise ClientGone("the body ended early")
        try:
            value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            value = None  # deeper than Python's stack: refused just below
        else:
            if _json_depth(value) <= MAX_JSON_DEPTH:
                return value
        raise ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")

    # ------------------------------------------------------------------ endpoints
    def _models(self, path: str) -> int:
        self.app.registry.check_ready()
        entries = [
            {
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": "edge-slm",
                "task": m.task,
                "context_length": m.model.manifest.context_length,
            }
            for m in self.app.registry.models
        ]
        if path in ("/v1/models", "/v1/models/"):
            return self._send_json(200, {"object": "list", "data": entries})
        name = path[len("/v1/models/") :]
        for entry in entries:
            if entry["id"] == name:
                return self._send_json(200, entry)
        raise ApiError(
            404, f"the model {name!r} does not exist", param="model", code="model_not_found"
        )

    def _deadline_left(self, started: float) -> float | None:
        timeout = self.app.config.request_timeout_s
        return None if timeout is None else max(timeout - (time.perf_counter() - started), 0.0)

    def _completions(self, body: dict[str, Any], started: float, chat: bool) -> int:
        app = self.app
        model_name = body.get("model") if isinstance(body.get("model"), str) else None
        served = app.registry.find(GENERATION, model_name or None)
        model = served.model
        manifest = model.manifest
        request = parse_completion(
            body,
            chat=chat,
            vocab_size=manifest.vocab_size,
            max_n=app.admission.max_live,
        )
        if len(request.jobs) > app.admission.max_live:
            raise bad_request(
                f"this request asks for {len(request.jobs)} generations; the server runs at "
                f"most {app.admission.max_live} at once",
                "n",
            )
        context = manifest.context_length
        cap = min(app.config.max_tokens or context, context)
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if request.max_tokens is not None and request.max_tokens > cap:
            raise bad_request(
                f"'{param}' is {request.max_tokens}, more than this server allows ({cap}"
                f"{'' if cap < context else ', the context length'})",
                param,
            )
        max_tokens = request.max_tokens or min(manifest.generation_defaults.max_new_tokens, cap)
        options = dict(request.options, max_new_tokens=max_tokens)
        # With tools the runtime's chat call renders, constrains and parses them (the
        # bundle's tool format); resolved here too, to refuse a bad request before any
        # stream starts and to count the prompt as it is encoded.
        tools = ToolUse.resolve(model, **request.tool_args) if request.tools else None
        options.update(request.tool_args)
        constraint = tools.constraint if tools is not None else options.get("constraint")
        if constraint is not None:  # an invalid schema is a 400 before any stream starts
            model.decode_config(edge_slm.GenerationOptions(constraint=constraint))
        prompt_tokens = self._prompt_tokens(model, request, tools)
        app.admission.acquire(len(request.jobs), self._deadline_left(started))
        run: Run | None = None
        try:
            left = self._deadline_left(started)
            if left is not None:
                options["deadline_s"] = max(left, 1e-3)
            app.metrics.prompt_tokens(served.id, prompt_tokens)
            run = Run(
                served, request.jobs, options, request.seed, app.metrics, started, app.shutting_down
            )
            run.start()
            if request.stream:
                return self._stream(run, request, prompt_tokens)
            return self._collect(run, request, prompt_tokens)
        except ClientGone:
            if run is not None:
                run.cancel("disconnect")
            raise
        finally:
            if run is not None:
                run.cancel("error")  # a no-op when every generation has ended
                run.join()
            app.admission.release(len(request.jobs))

    @staticmethod
    def _prompt_tokens(model: Any, request: CompletionRequest, tools: ToolUse | None) -> int:
        """Prompt tokens for usage, counted as the runtime encodes them (chat: the rendered
        template without added special tokens, with the tools if any; completions: with
        them)."""
        total = 0
        if request.chat:
            messages = request.jobs[0].messages
            assert messages is not None
            if tools is not None:
                return len(tools.prompt_ids(model, messages))
            # The ids the runtime feeds: with safe rendering, special-token text inside
            # messages is encoded as plain text, so the rendered prompt encoded whole
            # would count differently.
            ids = model.chat_ids([dict(m) for m in messages])
            return len(ids)  # n choices share one prompt (OpenAI counts it once)
        seen: set[int] = set()
        for job in request.jobs:
            if job.index - job.seed_offset in seen:
                continue
            seen.add(job.index - job.seed_offset)
            total += len(model.encode(job.prompt))
        return total

    @staticmethod
    def _raise(error: BaseException) -> None:
        if isinstance(error, EdgeSlmError):
            raise from_runtime_error(error)
        raise error

    def _collect(self, run: Run, request: CompletionRequest, prompt_tokens: int) -> int:
        texts: dict[int, list[str]] = {job.index: [] for job in request.jobs}
        steps: dict[int, list[Any]] = {job.index: [] for job in request.jobs}
        calls: dict[int, Any] = {job.index: () for job in request.jobs}
        for ev in run.events(self._client_gone):
            if ev.error is not None:
                self._raise(ev.error)
            texts[ev.job.index].append(ev.chunk.text)
            if ev.chunk.finish_reason is not None:
                calls[ev.job.index] = ev.chunk.tool_calls
            if request.logprobs:
                steps[ev.job.index].extend(ev.chunk.steps)
        if run.cancel_reason == "shutdown":
            raise busy("the server is shutting down", 503, "shutting_down")
        if run.cancel_reason == "disconnect":
            raise ClientGone("the client closed the connection")
        token_text = responses.TokenText(run.served.model)
        choices = []
        for job in request.jobs:
            text = "".join(texts[job.index])
            reason = responses.finish_reason(run.stats[job.index].finish_reason)
            if request.chat:
                logprobs = (
                    responses.chat_logprobs(steps[job.index], token_text)
                    if request.logprobs
                    else None
                )
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if calls[job.index]:
                    message.update(
                        content=None, tool_calls=[c.to_openai() for c in calls[job.index]]
                    )
                    reason = "tool_calls"
                choices.append(
                    {
                        "index": job.index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }
                )
            else:
                logprobs = (
                    responses.completion_logprobs(steps[job.index], token_text, 0)
                    if request.logprobs
                    else None
                )
                choices.append(
                    {
                        "index": job.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }
                )
        completion_tokens = sum(s.tokens for s in run.stats.values())
        payload = {
            "id": responses.new_id("chatcmpl" if request.chat else "cmpl"),
            "object": "chat.completion" if request.chat else "text_completion",
            "created": responses.now(),
            "model": run.served.id,
            "system_fingerprint": None,
            "choices": choices,
            "usage": responses.usage(prompt_tokens, completion_tokens),
        }
        return self._send_json(200, payload)

    def _stream(self, run: Run, request: CompletionRequest, prompt_tokens: int) -> int:
        events = run.events(self._client_gone)
        first = next(events, None)
        if first is not None and first.error is not None:
            self._raise(first.error)  # before the headers: a plain JSON error answer
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Accel-Buffering", "no")
            for name, value in self._cors().items():
                self.send_header(name, value)
            self.end_headers()
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None
        writer = ChunkedWriter(self.wfile)  # type: ignore[arg-type]
        base = {
            "id": responses.new_id("chatcmpl" if request.chat else "cmpl"),
            "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": responses.now(),
            "model": run.served.id,
            "system_fingerprint": None,
        }
        if request.include_usage:
            base["usage"] = None
        token_text = responses.TokenText(run.served.model)
        offsets = {job.index: 0 for job in request.jobs}
        held = {job.index: "" for job in request.jobs}  # with tools: the answer, sent at its end

        def send(choice: dict[str, Any]) -> None:
            writer.write(event({**base, "choices": [choice]}))

        if request.chat:  # the first delta of each choice names the role
            for job in request.jobs:
                send(
                    {
                        "index": job.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
        pending = [first] if first is not None else []
        for ev in _chain(pending, events):
            if ev.error is not None:
                error = (
                    from_runtime_error(ev.error)
                    if isinstance(ev.error, EdgeSlmError)
                    else ApiError(500, "internal server error", "server_error")
                )
                if not isinstance(ev.error, EdgeSlmError):
                    print("edge-slm serve: generation failed: " + repr(ev.error), file=sys.stderr)
                writer.write(event(error.body()))
                run.cancel("error")
                writer.close()
                return 200
            chunk, index = ev.chunk, ev.job.index
            reason = responses.finish_reason(
                str(chunk.finish_reason) if chunk.finish_reason is not None else None
            )
            if request.chat:
                logprobs = (
                    responses.chat_logprobs(chunk.steps, token_text) if request.logprobs else None
                )
                if request.may_call:  # calls or text: known at the end, sent in one delta
                    held[index] += chunk.text
                    if reason is None:
                        continue
                    if chunk.tool_calls:
                        items = [
                            {"index": i, **call.to_openai()}
                            for i, call in enumerate(chunk.tool_calls)
                        ]
                        delta: dict[str, Any] = {"content": None, "tool_calls": items}
                        reason = "tool_calls"
                    else:
                        delta = {"content": held[index]}
                    send({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
                elif chunk.text or logprobs:
                    send(
                        {
                            "index": index,
                            "delta": {"content": chunk.text},
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    )
                if reason is not None:
                    send({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
            else:
                logprobs = (
                    responses.completion_logprobs(chunk.steps, token_text, offsets[index])
                    if request.logprobs
                    else None
                )
                offsets[index] += len(chunk.text)
                send(
                    {
                        "index": index,
                        "text": chunk.text,
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }
                )
        if run.cancel_reason == "disconnect":
            raise ClientGone("the client closed the connection")
        if run.cancel_reason == "shutdown":
            writer.write(event(busy("the server is shutting down", 503, "shutting_down").body()))
            writer.close()
            return 200
        if request.include_usage:
            completion_tokens = sum(s.tokens for s in run.stats.values())
            writer.write(
                event(
                    {
                        **base,
                        "choices": [],
                        "usage": responses.usage(prompt_tokens, completion_tokens),
                    }
                )
            )
        writer.write(DONE)
        writer.close()
        return 200

    def _embeddings(self, body: dict[str, Any], started: float) -> int:
        request = parse_embeddings(body, self.app.config.max_inputs)
        served = self.app.registry.find(EMBEDDING, request.model)
        model = served.model
        dimension = getattr(model, "dimension", None)
        if request.dimensions is not None and request.dimensions != dimension:
            raise bad_request(
                f"'dimensions' must be this model's {dimension} (no shortening)", "dimensions"
            )
        with self._slot(started):
            vectors = model.embed_all(list(request.texts), truncation="error")
        tokens = _encoder_tokens(model, request.texts)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": responses.embedding_value(v, request.encoding_format),
            }
            for i, v in enumerate(vectors)
        ]
        return self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": served.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _classifications(self, body: dict[str, Any], started: float) -> int:
        request = parse_classifications(body, self.app.config.max_inputs)
        served = self.app.registry.find((CLASSIFICATION, TOKEN_CLASSIFICATION), request.model)
        if served.task == TOKEN_CLASSIFICATION:
            return self._token_classifications(request, served, started)
        for name in ("aggregation", "ignore_labels"):
            if getattr(request, name) is not None:
                raise bad_request(
                    f"'{name}' applies to token-classification models; {served.id!r} is a "
                    "text-classification model",
                    name,
                )
        with self._slot(started):
            results = list(
                served.model.classify(
                    list(request.texts),
                    top_k=request.top_k,
                    threshold=request.threshold,
                    truncation="error",
                )
            )
        tokens = _encoder_tokens(served.model, request.texts)
        data = [
            {
                "object": "classification",
                "index": i,
                "label": r.label,
                "score": r.score,
                "labels": list(r.labels),
                "scores": list(r.scores),
            }
            for i, r in enumerate(results)
        ]
        return self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": served.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _token_classifications(
        self, request: EncoderRequest, served: ServedModel, started: float
    ) -> int:
        """/v1/classifications on a token-classification model: entities per text."""
        for name in ("top_k", "threshold"):
            if getattr(request, name) is not None:
                raise bad_request(
                    f"'{name}' applies to text-classification models; {served.id!r} is a "
                    "token-classification model (use 'aggregation', 'ignore_labels')",
                    name,
                )
        with self._slot(started):
            results = list(
                served.model.classify(
                    list(request.texts),
                    aggregation=request.aggregation or "simple",
                    ignore_labels=request.ignore_labels,
                    truncation="error",
                )
            )
        tokens = _encoder_tokens(served.model, request.texts)
        data = [
            {"object": "token_classification", "index": i, "entities": r.to_dict()["entities"]}
            for i, r in enumerate(results)
        ]
        return self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": served.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _slot(self, started: float) -> _Slot:
        return _Slot(self.app.admission, self._deadline_left(started))


class _Slot:
    """One admission slot for the length of a ``with`` block."""

    def __init__(self, admission: Admission, timeout_s: float | None) -> None:
        self.admission = admission
        self.timeout_s = timeout_s

    def __enter__(self) -> None:
        self.admission.acquire(1, self.timeout_s)

    def __exit__(self, *exc: object) -> None:
        self.admission.release(1)


def _chain(first: list[Any], rest: Any) -> Any:
    yield from first
    yield from rest


def _encoder_tokens(model: Any, texts: tuple[str, ...]) -> int:
    """Tokens of ``texts`` under an encoder bundle's tokenizer (for ``usage``)."""
    tokenizer = getattr(getattr(model, "model", None), "tokenizer", None)
    if tokenizer is None:
        return 0
    return sum(len(e.ids) for e in tokenizer.encode_batch(list(texts)))
