"""HTTP pieces both engines share: OpenAI-shaped errors, API-key checks, health (no Ray)."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from sd2_ray.serve.openai_schema import OpenAIError, error_body

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_response(err: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> FastAPI:
    """Every error leaves in OpenAI's shape; client mistakes are 4xx, only our bugs are 500."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException):
        kind = _STATUS_TYPES.get(err.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(
            error_body(f"invalid '{param}': {first['msg']}", param=param, code="invalid_value"), status_code=400
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("request failed: %s", err)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)

    return app


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 in OpenAI's shape unless ``Authorization: Bearer <api_key>`` (when a key is set)."""
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise OpenAIError(
            "missing API key: send 'Authorization: Bearer <key>'",
            status=401,
            type="invalid_request_error",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise OpenAIError(
            "incorrect API key provided", status=401, type="invalid_request_error", code="invalid_api_key"
        )


def queue_full(capacity: int) -> OpenAIError:
    return OpenAIError(
        f"server is at capacity ({capacity} requests running or queued); retry later",
        status=503,
        type="service_unavailable",
        code="queue_full",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a server started next, on loopback)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
