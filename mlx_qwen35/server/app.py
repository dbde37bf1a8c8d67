"""The FastAPI app: the three front doors, API-key check, body-size limit, and every failure as
a 4xx/5xx JSON error in the shape of the API the request was for.

The server package imports FastAPI at module level; only `cli/server.py` imports the package,
and only once the flags are read, so `--help` and the other entry points never load it."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import UserError
from .auth import check_api_key
from .errors import APIError, error_body
from .state import ServerState

log = logging.getLogger("mlx_qwen35.server")


def create_app(state: ServerState) -> Any:
    from . import routes_anthropic, routes_openai, routes_responses

    app = FastAPI(title="mlx-qwen35", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    def error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, err), status_code=err.status)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return error(request, err)

    @app.exception_handler(UserError)
    async def on_user_error(request: Request, err: UserError) -> JSONResponse:
        return error(request, APIError(400, str(err)))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error(request, validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, err: HTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error(request, APIError(err.status_code, message))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return error(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))

    async def authorized(request: Request) -> None:
        check_api_key(
            state.config.api_key,
            request.headers.get("authorization"),
            request.headers.get("x-api-key"),
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    guarded = [Depends(authorized)]

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state, n) for n in state.config.model_names]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str) -> dict[str, Any]:
        return model_card(state, state.check_model(name))

    app.include_router(routes_openai.router, dependencies=guarded)
    app.include_router(routes_anthropic.router, dependencies=guarded)
    app.include_router(routes_responses.router, dependencies=guarded)
    return BodyLimit(app, state.config.max_body_bytes)


def model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "mlx-qwen35",
        "max_model_len": state.processor.max_position_embeddings,
    }


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's first complaint as one line, with the parameter path OpenAI clients show."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if not loc:
        message = "the request body must be a JSON object (Content-Type: application/json)"
        return APIError(400, message, code="invalid_json")
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "a required field is missing"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before parsing."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit
        self.state = app.state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope: dict, send: Any) -> None:
        err = APIError(413, f"the request body is over the server's limit of {self.limit} bytes")
        body = json.dumps(error_body(scope.get("path", ""), err)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event (Anthropic's and the Responses API's carry an event name)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"
