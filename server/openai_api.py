"""OpenAI-compatible inference, served by vLLM's own OpenAI serving layer with Mosaic's plan in front.

Every request to ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/tokenize`` and
``/detokenize`` goes the same way:

1. the body is parsed with vLLM's own protocol model for the endpoint, after Mosaic takes its one
   extension out (``composition``); a field that neither knows is refused with a 400 naming it;
2. Mosaic's limits and the ``model`` (base id, ``name``, ``name@N``, ``auto``) or ``composition`` turn
   into a plan and an adapter folder (materialised and cached by :class:`AdapterCache`);
3. vLLM's serving object handles the request with that adapter (:class:`LoraNames` lends vLLM a name
   for it for the duration of the call): sampling, logprobs, structured output, tools, ``n``, echo,
   streaming and its framing, usage and every parameter error are vLLM's own;
4. the response carries the client's ``model`` back, plus Mosaic's ``mosaic`` field: in the body, or on
   the first event of a stream, and always in the ``x-mosaic-plan`` header (compact JSON).

The reference engine (``MOSAIC_ENGINE=hf``) has no vLLM serving layer: server/hf_openai.py serves its
documented subset behind the same front.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from jinja2 import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from adapter_store.errors import ForbiddenError, InvalidRequestError, MosaicError, NotFoundError, UnavailableError
from adapter_store.validation import in_namespace
from adapter_store.registry import SkillInfo
from composer.spec import Composition
from router.plan import Plan
from server import hf_openai, limits, metrics
from server.errors import error_payload
from server import auth
from server.auth import require_scope
from server.engine import EngineAdapter
from server.protocol import MosaicInfo, content_text
from server.state import Mosaic

log = logging.getLogger("mosaic.server")
router = APIRouter(tags=["inference"], dependencies=[Depends(require_scope("inference"))])
PLAN_HEADER = "x-mosaic-plan"


def _state(request: Request) -> Mosaic:
    return request.app.state.mosaic


# --- what each endpoint reads ----------------------------------------------------------------------

def _messages(items: Any) -> list[dict]:
    if not isinstance(items, list):
        return []
    return [x.model_dump() if isinstance(x, BaseModel) else x for x in items if isinstance(x, (dict, BaseModel))]


def _last_user(items: Any) -> str:
    return next((content_text(x.get("content")) for x in reversed(_messages(items)) if x.get("role") == "user"), "")


def _all_messages(items: Any) -> list[str]:
    return [content_text(x.get("content")) for x in _messages(items)]


def _prompts(m: Mosaic, prompt: Any) -> list[str]:
    """The text of a completions prompt: a string, several strings, token ids, or several lists of them."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    tok = m.engine.tokenizer()
    vocab = len(tok) if tok is not None else 0
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and tok is not None:
            out.append(tok.decode([t for t in p if isinstance(t, int) and 0 <= t < vocab]))
    return out


def _input_texts(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else _all_messages(value)


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI route: vLLM's protocol model and serving method, and what Mosaic reads of the request."""

    serving: str  # the attribute of vLLM's serving state
    method: str
    protocol: Callable[[dict], type[BaseModel]]  # the request model for a body
    texts: Callable[[Mosaic, Any], list[str]]  # all prompt text (the character limit)
    routed: Callable[[Mosaic, Any], str]  # what the router and context-aware weights read
    dump: dict = field(default_factory=dict)  # vLLM's model_dump arguments for the response
    events: Callable | None = None  # turns a stream of event objects into SSE text (Responses API)


def _protocols():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

    return {
        "chat": Endpoint("openai_serving_chat", "create_chat_completion", lambda b: ChatCompletionRequest,
                         lambda m, r: _all_messages(r.messages), lambda m, r: _last_user(r.messages)),
        "completion": Endpoint("openai_serving_completion", "create_completion", lambda b: CompletionRequest,
                               lambda m, r: _prompts(m, r.prompt), lambda m, r: "\n".join(_prompts(m, r.prompt))),
        "responses": Endpoint("openai_serving_responses", "create_responses", lambda b: ResponsesRequest,
                              lambda m, r: _input_texts(r.input),
                              lambda m, r: r.input if isinstance(r.input, str) else _last_user(r.input),
                              dump={"mode": "json", "by_alias": True}, events=_convert_stream_to_sse_events),
        "tokenize": Endpoint("serving_tokenization", "create_tokenize",
                             lambda b: TokenizeChatRequest if "messages" in b else TokenizeCompletionRequest,
                             lambda m, r: _all_messages(r.messages) if hasattr(r, "messages") else [r.prompt],
                             lambda m, r: _last_user(r.messages) if hasattr(r, "messages") else r.prompt),
        "detokenize": Endpoint("serving_tokenization", "create_detokenize", lambda b: DetokenizeRequest,
                               lambda m, r: [], lambda m, r: ""),
    }


ENDPOINTS: dict[str, Endpoint] = {}


def endpoint(kind: str) -> Endpoint:
    if not ENDPOINTS:
        ENDPOINTS.update(_protocols())
    return ENDPOINTS[kind]


# --- the published request schemas ------------------------------------------------------------------

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses",
          "/tokenize": "tokenize", "/detokenize": "detokenize"}


def publish_request_schemas(spec: dict) -> None:
    """Put vLLM's request models, plus ``composition``, into the OpenAPI document as the request bodies
    of the inference routes (they read the raw body, so FastAPI cannot see them), with their
    definitions under ``components/schemas``."""
    from pydantic.json_schema import models_json_schema

    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

    classes = {kind: [endpoint(kind).protocol({})] for kind in ROUTES.values()}
    classes["tokenize"] = [TokenizeCompletionRequest, TokenizeChatRequest]
    models = {c for cs in classes.values() for c in cs}
    refs, top = models_json_schema([(c, "validation") for c in models], ref_template="#/components/schemas/{model}")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    if "Composition" not in components:  # FastAPI publishes it when an admin route takes one
        raise RuntimeError("the OpenAPI document has no Composition schema")
    for name, schema in top.get("$defs", {}).items():
        if name in components:
            raise RuntimeError(f"two schemas named {name!r} in the OpenAPI document")
        components[name] = schema
    composition = {"$ref": "#/components/schemas/Composition"}
    for path, kind in ROUTES.items():
        bodies = []
        for cls in classes[kind]:
            name = f"{cls.__name__}WithComposition"
            ref = refs[(cls, "validation")]["$ref"]
            components[name] = {"allOf": [{"$ref": ref}], "title": name, "type": "object",
                                "properties": {"composition": {**composition, "description": "Mosaic's extension: serve this request "
                                                                "with a composition of skills (instead of model)"}}}
            bodies.append({"$ref": f"#/components/schemas/{name}"})
        schema = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
        spec["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}


# --- the front --------------------------------------------------------------------------------------

MOSAIC_FIELDS = {"composition"}
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def field_names(cls: type[BaseModel]) -> set[str]:
    names = set(cls.model_fields)
    names |= {f.alias for f in cls.model_fields.values() if f.alias}
    return names


async def parse(request: Request, ep: Endpoint) -> tuple[Any, Composition | None]:
    """The request as vLLM's protocol model, and Mosaic's ``composition``. 400 on anything else."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise InvalidRequestError("send the request body as JSON (Content-Type: application/json)")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    cls = ep.protocol(body)
    unknown = sorted(set(body) - field_names(cls) - MOSAIC_FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: Mosaic serves the fields of "
            "vLLM's OpenAI protocol for this endpoint, plus 'composition'", param=unknown[0])
    composition = body.pop("composition", None)
    request.state.sent_fields = frozenset(body)
    return _validate(cls, body, ()), None if composition is None else _validate(Composition, composition, ("composition",))


def _validate(cls: type[BaseModel], value: Any, loc: tuple):
    try:
        return cls.model_validate(value)
    except ValidationError as exc:  # answered by the 400 handler in server/errors.py
        raise RequestValidationError([{**e, "loc": ("body", *loc, *e.get("loc", ()))} for e in exc.errors()]) from None
    except Exception as exc:  # a vLLM validator's own error (VLLMValidationError), answered as vLLM answers it
        err = vllm_error(exc, log_server_errors=False)
        if err.error.code >= 500:  # a validator that broke on a value of the wrong shape: still the request's fault
            raise InvalidRequestError(f"the request has a value of the wrong shape ({type(exc).__name__}: {exc})"[:500]) from None
        raise Refused(err) from None


class Refused(Exception):
    """A request vLLM's protocol refused, with vLLM's error response."""

    def __init__(self, error) -> None:
        super().__init__(error.error.message)
        self.error = error


def check_limits(m: Mosaic, ep: Endpoint, req: Any, composition: Composition | None,
                 sent: frozenset[str] | None = None) -> None:
    """Mosaic's limits on a parsed request; ``sent``: the fields the client sent (None: all of them)."""
    if composition is not None:
        limits.check_composition(m.settings, composition)
    limits.check_prompt_chars(m.settings, ep.texts(m, req), "prompt" if hasattr(req, "prompt") else "messages")
    if m.engine.serving is not None and m.settings.max_prompt_tokens < m.settings.max_model_len - 1:
        # tighter than the context that vLLM checks itself: count the prompt here
        for n in prompt_token_counts(m, req):
            limits.check_prompt_tokens(m.settings, n, "prompt" if hasattr(req, "prompt") else "messages")
    for name in MAX_TOKENS_FIELDS:  # as sent: a default (completions: 16) is capped by the engine, not refused
        value = vars(req).get(name) if sent is None or name in sent else None
        if isinstance(value, int) and value > m.settings.max_tokens_limit:
            raise InvalidRequestError(
                f"{name}={value} is more than the server allows ({m.settings.max_tokens_limit}, setting "
                "MOSAIC_MAX_TOKENS_LIMIT)", param=name)


def prompt_token_counts(m: Mosaic, req: Any) -> list[int]:
    """Prompt lengths in tokens, by the model's tokenizer (chat: through its chat template)."""
    tok = m.engine.tokenizer()
    if hasattr(req, "messages"):
        messages = [{"role": x.get("role"), "content": content_text(x.get("content"))} for x in _messages(req.messages)]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return [len(tok(text, add_special_tokens=False)["input_ids"])]
        except (ValueError, TypeError, TemplateError):  # the template refuses these messages: vLLM answers that
            return []
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, str):
        return [len(tok(prompt)["input_ids"])]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [len(prompt)]
    return [len(p) if isinstance(p, list) else len(tok(p)["input_ids"]) for p in prompt or []]


class LoraNames:
    """Lends vLLM's model registry a name for each adapter Mosaic serves, while a request uses it.

    vLLM's serving classes find a request's adapter by looking its ``model`` up in
    ``OpenAIServingModels.lora_requests``; Mosaic puts the adapter there under a name of its content
    (``mosaic-<folder>``) for the duration of the call and takes it out when no request holds it."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    @contextmanager
    def hold(self, models, adapter: EngineAdapter):
        from vllm.lora.request import LoRARequest

        name = f"mosaic-{Path(adapter.path).name}"
        models.lora_requests.setdefault(name, LoRARequest(name, adapter.int_id, adapter.path))
        self._held[name] += 1
        try:
            yield name
        finally:
            self._held[name] -= 1
            if not self._held[name]:
                del self._held[name]
                models.lora_requests.pop(name, None)


LORA_NAMES = LoraNames()


async def serve(request: Request, kind: str) -> Response:
    m = _state(request)
    ep = endpoint(kind)
    try:
        req, composition = await parse(request, ep)
    except Refused as exc:
        return error_json(exc.error)
    if not m.engine.ready():
        raise UnavailableError("the engine is not ready yet (it is starting or has failed)")
    check_limits(m, ep, req, composition, request.state.sent_fields)
    client_model = req.model or m.base_id  # the name the response reports
    plan = await plan_for(m, client_model, composition, ep.routed(m, req), auth.namespace(request))
    try:  # a composition may take a while: if the client leaves first, its work is abandoned
        adapter, info = await unless_disconnected(request, serve_plan(m, plan))
    except ClientGone:
        return Response(status_code=499)
    mosaic = info.model_dump(mode="json", exclude_none=True)
    headers = {PLAN_HEADER: json.dumps(mosaic, separators=(",", ":"))}
    observed = Observation(info.plan, _target(m, info))
    if m.engine.serving is None:
        try:
            result = await hf_openai.handle(m, kind, req, adapter, client_model)
        except Exception:
            observed.done("error")
            raise
        return respond(result, ep, client_model, client_model, mosaic, headers, observed)
    serving = m.engine.serving
    from vllm.entrypoints.serve.utils.api_utils import with_cancellation

    handler = getattr(getattr(serving, ep.serving), ep.method)
    with (LORA_NAMES.hold(serving.openai_serving_models, adapter) if adapter else _no_lora(m)) as served_name:
        if req.model is not None or adapter is not None:
            req.model = served_name
        try:
            # vLLM's own routes' wrapper: the work is cancelled if the client disconnects first (result None)
            result = await with_cancellation(handler)(req, request)
        except Exception as exc:  # vLLM's own server turns these into responses in its exception handlers
            result = vllm_error(exc)
    return respond(result, ep, served_name, client_model, mosaic, headers, observed)


class ClientGone(Exception):
    """The client disconnected before the work it asked for was done."""


async def unless_disconnected(request: Request, work: Awaitable):
    """``work``'s result, or ClientGone (with ``work`` cancelled) if the client disconnects first. The body
    has been read by then, so the next message the server receives is the disconnect (as vLLM's routes do)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled: so is its work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


@contextmanager
def _no_lora(m: Mosaic):
    yield m.base_id


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
    type_, code = {400: ("invalid_request_error", "invalid_request"), 404: ("invalid_request_error", "not_found"),
                   501: ("server_error", "not_implemented"), 503: ("server_error", "service_unavailable")}.get(
        status, ("invalid_request_error", str(status)) if status < 500 else ("server_error", "internal_error"))
    body = {"error": {"message": err.error.message, "type": type_, "param": err.error.param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def respond(result, ep: Endpoint, served_name: str, client_model: str, mosaic: dict, headers: dict,
            observed: Observation) -> Response:
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
    return StreamingResponse(_stream(stream, rename if client_model != served_name else None, mosaic, observed),
                             media_type="text/event-stream", headers=headers)


async def _stream(events: AsyncIterator[str], rename: tuple[str, str] | None, mosaic: dict,
                  observed: Observation) -> AsyncIterator[str]:
    """vLLM's SSE events as vLLM frames them; the client's model name put back, and ``mosaic`` on the first event.

    The rename is a plain replacement of ``"model":"<served name>"``: inside a JSON string a quote is
    escaped, so that byte sequence can only be the response's own ``model`` key."""
    outcome, usage, first = "error", None, True
    try:
        async for event in events:
            if rename is not None:
                event = event.replace(*rename)
            if '"usage":{' in event:
                usage = _usage_of(event) or usage
            if first and "data: {" in event:
                event, first = _with_mosaic(event, mosaic), False
            yield event
        outcome = "ok"
    except Exception as exc:  # the response has started: the error goes on the stream, and the stream ends as usual
        log.error("a stream failed after it started", exc_info=exc)
        err = exc if isinstance(exc, MosaicError) else MosaicError("the stream failed inside the server; see its log")
        yield f"data: {json.dumps(error_payload(err), separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        observed.done(outcome, usage)


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


def _usage_of(event: str) -> dict | None:
    try:
        body = json.loads(_data(event)[1])
    except ValueError:
        return None
    usage = body.get("usage") if isinstance(body, dict) else None
    if usage is None and isinstance(body, dict) and isinstance(body.get("response"), dict):
        usage = body["response"].get("usage")  # Responses API: response.completed carries it
    return usage if isinstance(usage, dict) else None


class Observation:
    """Counts one request, its tokens and its time to the last byte, whatever the response shape.
    Tokens are counted where the response reports usage (every non-streamed response; a stream when
    it asks for usage with ``stream_options``)."""

    def __init__(self, plan: str, target: str) -> None:
        self.plan, self.target, self.t0 = plan, target, time.monotonic()

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


def _target(m: Mosaic, info: MosaicInfo) -> str:
    if info.plan == "base":
        return m.base_id
    if info.plan == "composition":
        return "composition"
    return info.skills[0].split("@")[0]


@router.post("/v1/chat/completions", responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(request: Request) -> Response:
    """vLLM's chat completions (every field of its protocol), plus ``composition``."""
    return await serve(request, "chat")


@router.post("/v1/completions", responses={200: {"content": {"text/event-stream": {}}}})
async def completions(request: Request) -> Response:
    """vLLM's completions (every field of its protocol), plus ``composition``."""
    return await serve(request, "completion")


@router.post("/v1/responses", responses={200: {"content": {"text/event-stream": {}}}})
async def responses(request: Request) -> Response:
    """vLLM's OpenAI Responses API, as far as vLLM serves it, plus ``composition``."""
    return await serve(request, "responses")


@router.get("/v1/responses/{response_id}", responses={200: {"content": {"text/event-stream": {}}}})
async def retrieve_response(response_id: str, request: Request, starting_after: int | None = None,
                            stream: bool = False) -> Response:
    """vLLM's stored response by id. vLLM keeps responses only when it runs with
    ``VLLM_ENABLE_RESPONSES_API_STORE=1`` (off by default: its store only grows); otherwise 404, as vLLM answers."""
    serving = _responses_serving(request)
    result = await serving.retrieve_responses(response_id, starting_after=starting_after, stream=stream)
    return _stored(result)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> Response:
    """Cancel a background response that vLLM stores (see ``GET /v1/responses/{response_id}``)."""
    return _stored(await _responses_serving(request).cancel_responses(response_id))


def _responses_serving(request: Request):
    m = _state(request)
    if m.engine.serving is None:
        raise InvalidRequestError("the reference engine (MOSAIC_ENGINE=hf) keeps no responses: use the vLLM engine")
    if not m.engine.ready():
        raise UnavailableError("the engine is not ready yet (it is starting or has failed)")
    return m.engine.serving.openai_serving_responses


def _stored(result) -> Response:
    """A stored response as vLLM's route answers it; its ``model`` is the name Mosaic lent vLLM for the
    adapter (``mosaic-<folder>``): the client's own name for it is not stored."""
    from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        return error_json(result)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json", by_alias=True))
    return StreamingResponse(_convert_stream_to_sse_events(result), media_type="text/event-stream")


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """vLLM's tokenizer endpoint (a prompt, or chat messages through the chat template)."""
    return await serve(request, "tokenize")


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    """vLLM's detokenizer endpoint."""
    return await serve(request, "detokenize")


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """vLLM's model cards: the base model, every skill (``parent`` = the base id, as vLLM's LoRA cards),
    and ``auto``; Mosaic's own fields under ``mosaic`` (a skill's details only for callers with ``read``)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, ModelPermission

    m = _state(request)
    skills = await asyncio.to_thread(m.registry.list)
    if (ns := auth.namespace(request)) is not None:
        skills = [s for s in skills if in_namespace(s.name, ns)]
    context = m.settings.max_model_len

    def card(id_: str, created: float, root: str, parent: str | None, mosaic: dict) -> ModelCard:
        return ModelCard(id=id_, created=int(created), owned_by="mosaic", root=root, parent=parent,
                         max_model_len=context, permission=[ModelPermission()], mosaic=mosaic)

    # a skill's details (content, rank, description) are the library's: shown to callers who may read it
    # (a key limited to a namespace: that namespace's)
    try:
        read_ns, detail = auth.check(m, "read", request.headers, request.client.host if request.client else None), True
    except MosaicError:
        read_ns, detail = None, False
    cards = [card(m.base_id, m.started, m.base_id, None, {"kind": "base"})]
    cards += [card(s.name, s.created, s.ref, m.base_id,
                   {"kind": "skill", "version": s.version,
                    **({"content_id": s.content_id, "rank": s.rank, "description": s.description}
                       if detail and (read_ns is None or in_namespace(s.name, read_ns)) else {})})
              for s in skills]
    if ns is None:  # a key limited to a namespace cannot route over the whole library
        cards.append(card("auto", m.started, "auto", m.base_id, {"kind": "router"}))
    return JSONResponse(ModelList(data=cards).model_dump())


# --- plans -----------------------------------------------------------------------------------------

async def plan_for(m: Mosaic, model: str, composition: Composition | None, text: str,
                   namespace: str | None = None) -> Plan:
    """Explicit plans (base, a named skill, a composition) and ``auto`` (the router's choice).
    A context-aware composition (``weights="auto"``), given in the request or stored under a name,
    gets its weights from ``text``. With a ``namespace`` (the key's), only that namespace's skills."""
    if namespace is not None:
        outside = [s for s in (composition.skills if composition is not None else ())
                   if not in_namespace(s, namespace)]
        if composition is None and model not in ("auto", m.base_id) and not in_namespace(model, namespace):
            outside.append(model)
        if outside:
            raise ForbiddenError(f"this API key reaches only skills named '{namespace}/…', not "
                                 f"{', '.join(map(repr, outside))}", param="composition" if composition else "model")
        if composition is None and model == "auto":
            raise ForbiddenError(f"this API key is limited to the namespace '{namespace}'; 'auto' chooses among the "
                                 "whole library: send a composition with weights 'auto' over your skills", param="model")
    if composition is not None:
        limits.check_composition(m.settings, composition)
        if composition.context_aware:
            for ref in composition.skills:  # every skill must exist, even one this prompt will leave out
                await m.cache.resolve(ref)
            return await m.route_within(text, composition)
        return Plan(kind="composition", composition=composition, reason="composition given in the request")
    if model == "auto":
        return await m.route(text)
    if model == m.base_id:
        return Plan(kind="base", reason="base model requested")
    try:
        info = await asyncio.to_thread(m.registry.info, model)
    except UnavailableError:
        if not m.cache.knows(model):
            raise
        info = None  # served before: keeps serving from its local folder while Redis is away
    except NotFoundError:
        raise NotFoundError(f"the model {model!r} does not exist: use the base model {m.base_id!r}, a skill name, or 'auto'",
                            param="model") from None
    if info is not None and (template := stored_template(info)) is not None:
        if namespace is not None and (outside := [s for s in template.skills if not in_namespace(s, namespace)]):
            raise ForbiddenError(f"{info.ref} composes skills outside the namespace '{namespace}' "
                                 f"({len(outside)} of {len(template.skills)}), which this API key does not reach",
                                 param="model")
        plan = await m.route_within(text, template)
        return plan.model_copy(update={"reason": f"{info.ref} is context-aware: {plan.reason}"})
    return Plan(kind="skill", skill=model, reason="skill requested by name")


def stored_template(info: SkillInfo) -> Composition | None:
    """The context-aware composition a stored skill stands for (its pinned skills, method, rank), or None."""
    stored = info.composition or {}
    if stored.get("weights") != "auto":
        return None
    return Composition.model_validate({k: v for k, v in stored.items() if k in Composition.model_fields})


async def serve_plan(m: Mosaic, plan: Plan) -> tuple[EngineAdapter | None, MosaicInfo]:
    info = {"plan": plan.kind, "reason": plan.reason, "scores": plan.scores or None}
    if plan.kind == "base":
        return None, MosaicInfo(**info)
    if plan.kind == "skill":
        served = await m.cache.skill(plan.skill)
    elif plan.alpha is None:
        served = await m.cache.composition(plan.composition)
    else:  # context-aware: skills whose weight came out 0 are left out; one left is served alone, exactly
        active = plan.active
        if len(active) == 1:
            served = await m.cache.skill(active[0][0])
        else:
            skills, weights = zip(*active)
            served = await m.cache.composition(plan.composition.model_validate(
                {**plan.composition.model_dump(), "skills": skills, "weights": weights}))
        info |= {"alpha": dict(zip(plan.composition.skills, plan.alpha)), "weights_from": "auto",
                 "template": {"skills": list(plan.composition.skills), "method": plan.composition.method}}
    if served.cache is not None:
        metrics.COMPOSITIONS.labels(result=served.cache).inc()
    return served.adapter, MosaicInfo(**info, **served.describe())


# --- the router, without generating ----------------------------------------------------------------

class RouteRequest(BaseModel):
    prompt: str | None = Field(default=None, description="the text to route")
    messages: list[dict] | None = Field(default=None, description="or chat messages (the last user turn is routed)")
    composition: Composition | None = Field(
        default=None, description="a context-aware composition (weights 'auto'): its weights for this prompt")
    model: str | None = Field(default=None, description="a stored context-aware composition: its weights for this prompt")


@router.post("/v1/route", response_model=Plan, tags=["router"])
async def route(req: RouteRequest, request: Request) -> Plan:
    """The router's decision for a prompt, without generating (or, given a context-aware composition
    or the name of a stored one, the weights it would be served with)."""
    if req.prompt is None and not req.messages:
        raise InvalidRequestError("give a prompt or messages", param="prompt")
    m = _state(request)
    text = req.prompt if req.prompt is not None else _last_user(req.messages)
    limits.check_prompt_chars(m.settings, [text], "prompt" if req.prompt is not None else "messages")
    if req.composition is not None or req.model not in (None, "auto") or auth.namespace(request) is not None:
        return await plan_for(m, req.model or "auto", req.composition, text, auth.namespace(request))
    return await m.route(text)

