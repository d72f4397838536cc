"""What vLLM's serving layer answers, as Mosaic answers it: the client's ``model`` put back, Mosaic's
``mosaic`` field added (in the body, or on the first event of a stream), vLLM's errors in Mosaic's error
shape, and every request counted in the metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from lora.errors import MosaicError
from server.core import metrics
from server.edge.errors import error_payload
from server.front.endpoints import Endpoint

log = logging.getLogger("mosaic.server")


def vllm_error(exc: Exception, log_server_errors: bool = True):
    """An exception from vLLM's serving layer as vLLM's own server answers it."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err = create_error_response(exc)
    if err.error.code >= 500 and log_server_errors:
        log.error("vLLM's serving layer failed", exc_info=exc)
    return err


def error_json(err, headers: dict | None = None) -> JSONResponse:
    """vLLM's error response (its status, message and param) in Mosaic's vocabulary of OpenAI error
    types and codes, so that a client sees one error shape whichever layer refused the request."""
    status = err.error.code
    type_, code = error_terms(status)
    body = {"error": {"message": err.error.message, "type": type_, "param": err.error.param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_terms(status: int) -> tuple[str, str]:
    """The OpenAI error type and Mosaic's code for an HTTP status vLLM reported."""
    return {400: ("invalid_request_error", "invalid_request"), 404: ("invalid_request_error", "not_found"),
            501: ("server_error", "not_implemented"), 503: ("server_error", "service_unavailable")}.get(
        status, ("invalid_request_error", str(status)) if status < 500 else ("server_error", "internal_error"))


class Observation:
    """Counts one request, its tokens and its time to the last byte, whatever the response shape.
    Tokens are counted from the usage the response reports; for a stream that did not ask for usage,
    from what vLLM's serving layer recorded of it (``metadata_from``: the request's state), or on the
    reference engine from a usage event asked for on its behalf and kept from the client (``hide_usage``)."""

    def __init__(self, plan: str, target: str) -> None:
        self.plan, self.target, self.t0 = plan, target, time.monotonic()
        self.hide_usage = False
        self.metadata_from = None

    def recorded_usage(self) -> dict | None:
        """The usage vLLM recorded for this request (``request.state.request_metadata.final_usage_info``)."""
        metadata = getattr(self.metadata_from, "request_metadata", None)
        usage = getattr(metadata, "final_usage_info", None)
        return usage.model_dump() if usage is not None else None

    def done(self, outcome: str, usage: dict | None = None) -> None:
        seconds = time.monotonic() - self.t0
        metrics.REQUESTS.labels(plan=self.plan, outcome=outcome).inc()
        metrics.LATENCY.labels(plan=self.plan).observe(seconds)
        metrics.TARGET_REQUESTS.labels(target=self.target, outcome=outcome).inc()
        metrics.TARGET_LATENCY.labels(target=self.target).observe(seconds)
        if usage:
            prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
            completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
            metrics.TARGET_TOKENS.labels(target=self.target, kind="prompt").inc(prompt)
            metrics.TARGET_TOKENS.labels(target=self.target, kind="completion").inc(completion)


def respond(result, ep: Endpoint, served_name: str, client_model: str, mosaic: dict, headers: dict,
            observed: Observation) -> Response:
    """The response to a served request: vLLM's result (a response, an error, a stream, or None when
    the client went away) with the client's ``model``, ``mosaic`` and the plan header."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if result is None:  # the client went away
        observed.done("cancelled")
        return Response(status_code=499)
    if isinstance(result, ErrorResponse):
        observed.done("error")
        return error_json(result, headers)
    if isinstance(result, BaseModel):
        body = result.model_dump(**ep.dump)
        if "model" in body:
            body["model"] = client_model
        body["mosaic"] = mosaic
        observed.done("ok", body.get("usage"))
        return JSONResponse(body, headers=headers)
    stream = ep.events(result) if ep.events else result
    rename = (f'"model":{json.dumps(served_name)}', f'"model":{json.dumps(client_model)}')
    return StreamingResponse(stream_events(stream, rename if client_model != served_name else None, mosaic, observed),
                             media_type="text/event-stream", headers=headers)


def stored_response(result) -> Response:
    """A stored response as vLLM's route answers it; its ``model`` is the name Mosaic lent vLLM for the
    adapter (``mosaic-<folder>``): the client's own name for it is not stored."""
    from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        return error_json(result)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json", by_alias=True))
    return StreamingResponse(_convert_stream_to_sse_events(result), media_type="text/event-stream")


# --- streams ---------------------------------------------------------------------------------------

async def stream_events(events: AsyncIterator[str], rename: tuple[str, str] | None, mosaic: dict,
                  observed: Observation) -> AsyncIterator[str]:
    """vLLM's SSE events as vLLM frames them; the client's model name put back, and ``mosaic`` on the first event.

    The rename is a plain replacement of ``"model":"<served name>"``: inside a JSON string a quote is
    escaped, so that byte sequence can only be the response's own ``model`` key."""
    outcome, usage, first = "", None, True
    try:
        async for event in events:
            if rename is not None:
                event = event.replace(*rename)
            if '"usage":{' in event:
                usage = _usage_of(event) or usage
                if observed.hide_usage and '"choices":[]' in event:  # the usage event the client did not ask for
                    continue
            if '"error"' in event:
                event, failed = _in_mosaic_terms(event)
                outcome = "error" if failed else outcome
            if first and "data: {" in event:
                event, first = _with_mosaic(event, mosaic), False
            yield event
        outcome = outcome or "ok"
    except Exception as exc:  # the response has started: the error goes on the stream, and the stream ends as usual
        outcome = "error"
        log.error("a stream failed after it started", exc_info=exc)
        err = exc if isinstance(exc, MosaicError) else MosaicError("the stream failed inside the server; see its log")
        yield f"data: {json.dumps(error_payload(err), separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        observed.done(outcome or "error", usage or observed.recorded_usage())  # no outcome: cancelled midway


def _data(event: str) -> tuple[str, str, str]:
    head, _, rest = event.partition("data: ")
    data, sep, tail = rest.partition("\n")
    return head, data, sep + tail


def _with_mosaic(event: str, mosaic: dict) -> str:
    head, data, tail = _data(event)
    try:
        body = json.loads(data)
    except ValueError:
        return event
    if isinstance(body, dict) and "error" not in body:
        body["mosaic"] = mosaic
    return head + "data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False) + tail


def _in_mosaic_terms(event: str) -> tuple[str, bool]:
    """vLLM's error event (it catches an engine failure mid-stream itself: its type is the exception's class
    name and its code the HTTP status) in the error vocabulary of Mosaic's responses; and whether it was one."""
    head, data, tail = _data(event)
    try:
        body = json.loads(data)
    except ValueError:
        return event, False
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), int):
        return event, False
    log.error("the engine failed during a stream: %s", error.get("message"))
    error["type"], error["code"] = error_terms(error["code"])
    return head + "data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False) + tail, True


def _usage_of(event: str) -> dict | None:
    try:
        body = json.loads(_data(event)[1])
    except ValueError:
        return None
    usage = body.get("usage") if isinstance(body, dict) else None
    if usage is None and isinstance(body, dict) and isinstance(body.get("response"), dict):
        usage = body["response"].get("usage")  # Responses API: response.completed carries it
    return usage if isinstance(usage, dict) else None
