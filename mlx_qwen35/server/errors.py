"""Errors as each API writes them: OpenAI's `{"error": {"message", "type", "param", "code"}}`,
Anthropic's `{"type": "error", "error": {"type", "message"}}`."""

from __future__ import annotations

from typing import Any

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """A request the server refuses: HTTP status, one line saying what to do, and for OpenAI
    clients the offending parameter and a machine-readable code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type


def openai_body(error: APIError) -> dict[str, Any]:
    kind = error.type or OPENAI_TYPES.get(error.status, "server_error")
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.param,
            "code": error.code,
        }
    }


def anthropic_body(error: APIError) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, error: APIError) -> dict[str, Any]:
    """The error body in the shape of the API that `path` belongs to."""
    return anthropic_body(error) if is_anthropic_path(path) else openai_body(error)
