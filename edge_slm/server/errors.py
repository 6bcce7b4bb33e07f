"""Errors as OpenAI answers them: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers with goes through :class:`ApiError`; runtime errors
(:class:`edge_slm.EdgeSlmError`) are mapped by :func:`from_runtime_error`. Nothing else
reaches a client: an unexpected exception becomes a 500 with a generic message (the
traceback goes to the server's log only).
"""

from __future__ import annotations

from typing import Any

from edge_slm.errors import (
    CapacityError,
    ContextLengthError,
    DeadlineError,
    EdgeSlmError,
    InvalidArgumentError,
)

RETRY_AFTER_S = 1
"""What ``Retry-After`` says when the server is busy or still loading (seconds)."""


class ApiError(Exception):
    """An error answer: HTTP status, OpenAI's error fields and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body (OpenAI's error shape)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


def busy(message: str, status: int = 503, code: str = "server_busy") -> ApiError:
    """A 429 or 503 with ``Retry-After``."""
    kind = "rate_limit_error" if status == 429 else "server_error"
    return ApiError(status, message, kind, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def from_runtime_error(exc: EdgeSlmError) -> ApiError:
    """Map a runtime error to its answer: capacity -> 503, bad input -> 400."""
    if isinstance(exc, CapacityError):  # the model's max_sessions all generating
        return busy(str(exc), 503, "capacity_exceeded")
    if isinstance(exc, DeadlineError):  # the prompt alone took longer than the deadline
        return busy(str(exc), 503, "deadline_exceeded")
    if isinstance(exc, ContextLengthError):
        return bad_request(str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidArgumentError):
        return bad_request(str(exc))
    # Chat template, bundle or other runtime errors: the request cannot be served as sent.
    return bad_request(str(exc), code=type(exc).__name__)
