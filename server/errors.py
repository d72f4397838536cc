"""The HTTP boundary for errors: every failure leaves in OpenAI's error shape."""

from __future__ import annotations

import logging

import redis

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store.errors import InvalidRequestError, MosaicError

log = logging.getLogger("mosaic.server")


# ---- the server's own errors (the store's are in adapter_store/errors.py) -------------------
class AuthError(MosaicError, PermissionError):
    """No API key, or an unknown or revoked one."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ForbiddenError(MosaicError, PermissionError):
    """A valid API key without the scope the endpoint needs."""

    status = 403
    type = "invalid_request_error"
    code = "insufficient_scope"


class PayloadTooLargeError(InvalidRequestError):
    """An upload, or an archive's contents, over the server's size limit."""

    status = 413
    code = "payload_too_large"


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_payload(exc: MosaicError) -> dict:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def install(app: FastAPI) -> None:
    @app.exception_handler(MosaicError)
    async def _mosaic(_: Request, exc: MosaicError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return JSONResponse(status_code=exc.status, content=error_payload(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return error_response(400, "; ".join(parts) or "invalid request", "invalid_request_error", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_, str(exc.status_code))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis(_: Request, exc: Exception) -> JSONResponse:
        # a Redis call outside the registry's own guard (e.g. an API-key lookup)
        log.warning("Redis unavailable: %s", exc)
        return error_response(503, "the skill registry (Redis) is unavailable; try again shortly", "server_error",
                              "service_unavailable")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")
