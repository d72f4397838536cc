"""The HTTP boundary for errors: every failure leaves in OpenAI's error shape."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora.errors import InvalidRequestError, MosaicError

log = logging.getLogger("mosaic.server")


# ---- the one error only the HTTP edge raises (every room's are in lora/errors.py) -----------
class PayloadTooLargeError(InvalidRequestError):
    """An upload, or an archive's contents, over the server's size limit."""

    code = "payload_too_large"


# ---- every error code's HTTP status, in one table ------------------------------------------
STATUS = {
    "invalid_request": 400, "invalid_adapter": 400,
    "invalid_api_key": 401,
    "insufficient_scope": 403,
    "model_not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "composition_failed": 422, "below_best_input": 422,
    "internal_error": 500,
    "service_unavailable": 503, "registry_behind": 503,
}


def http_status(exc: MosaicError) -> int:
    """The status of ``exc``'s code; a code the table lacks takes its nearest ancestor's (an error class
    added without a row keeps its family's status: a caller's fault stays a 4xx)."""
    for cls in type(exc).__mro__:
        if (code := cls.__dict__.get("code")) in STATUS:
            return STATUS[code]
    return 500


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for a status."""
    return "invalid_request_error" if status < 500 else "server_error"


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_payload(exc: MosaicError) -> dict:
    return {"error": {"message": exc.message, "type": error_type(http_status(exc)), "param": exc.param,
                      "code": exc.code}}


def mosaic_error_response(exc: MosaicError, headers: dict | None = None) -> JSONResponse:
    """``exc`` in OpenAI's error shape with its status (a 401 asks for a bearer token)."""
    status = http_status(exc)
    if status == 401:
        headers = {"www-authenticate": "Bearer", **(headers or {})}
    return JSONResponse(status_code=status, content=error_payload(exc), headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(MosaicError)
    async def _mosaic(_: Request, exc: MosaicError) -> JSONResponse:
        if not exc.caller_fault:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return mosaic_error_response(exc)

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
        return error_response(exc.status_code, str(exc.detail), error_type(exc.status_code), str(exc.status_code))

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
