"""OpenAI-compatible inference: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from adapter_store.errors import InvalidRequestError, MosaicError, NotFoundError, UnavailableError
from adapter_store.registry import SkillInfo
from composer.spec import Composition
from router.plan import Plan
from server import limits, metrics
from server.auth import require_scope
from server.engine import Chunk, EngineAdapter, GenerationParams
from server.errors import error_payload
from server.protocol import ChatMessage, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, MosaicInfo
from server.state import Mosaic

router = APIRouter(tags=["inference"], dependencies=[Depends(require_scope("inference"))])


def _state(request: Request) -> Mosaic:
    return request.app.state.mosaic


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    m = _state(request)
    skills = await asyncio.to_thread(m.registry.list)
    cards = [ModelCard(id=m.base_id, created=int(m.started), owned_by="mosaic", mosaic={"kind": "base"})]
    cards += [
        ModelCard(
            id=s.name, created=int(s.created), owned_by="mosaic", root=m.base_id, parent=m.base_id,
            mosaic={"kind": "skill", "version": s.version, "sha256": s.sha256, "rank": s.rank, "description": s.description},
        )
        for s in skills
    ]
    cards.append(ModelCard(id="auto", created=int(m.started), owned_by="mosaic", mosaic={"kind": "router"}))
    return ModelList(data=cards)


async def plan_for(m: Mosaic, model: str, composition: Composition | None, text: str) -> Plan:
    """Explicit plans (base, a named skill, a composition) and ``auto`` (the router's choice).
    A context-aware composition (``weights="auto"``), given in the request or stored under a name,
    gets its weights from ``text``."""
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


def _params(m: Mosaic, req, prompt_len: int, max_tokens: int | None, param: str) -> GenerationParams:
    limits.check_prompt_tokens(m.settings, prompt_len, param)
    return GenerationParams(
        max_tokens=limits.check_max_tokens(m.settings, prompt_len, max_tokens), temperature=req.temperature,
        top_p=req.top_p, stop=req.stop_list(), seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
    )


def _ready(m: Mosaic) -> None:
    if not m.engine.ready():
        raise UnavailableError("the engine is not ready yet (it is starting or has failed)")


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    m = _state(request)
    _ready(m)
    limits.check_prompt_chars(m.settings, (x.text() for x in req.messages), "messages")
    tok = m.engine.tokenizer()
    messages = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in req.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template's own validation (e.g. role order)
        raise InvalidRequestError(f"the messages do not fit the model's chat template: {exc}", param="messages") from exc
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    params = _params(m, req, len(prompt_ids), req.max_completion_tokens or req.max_tokens, "messages")
    last_user = next((x.text() for x in reversed(req.messages) if x.role == "user"), "")
    plan = await plan_for(m, req.model, req.composition, last_user)
    adapter, info = await serve_plan(m, plan)
    return await _respond(m, req, prompt_ids, params, adapter, info, chat=True)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    m = _state(request)
    _ready(m)
    tok = m.engine.tokenizer()
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        if not all(0 <= t < len(tok) for t in prompt):
            raise InvalidRequestError(f"token ids must lie in [0, {len(tok)})", param="prompt")
        prompt_ids, text = list(prompt), tok.decode(prompt)
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequestError("send one prompt per request (a list of several is not served)", param="prompt")
            prompt = prompt[0]
        text = str(prompt)
        limits.check_prompt_chars(m.settings, [text], "prompt")
        prompt_ids = tok(text)["input_ids"]
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    params = _params(m, req, len(prompt_ids), req.max_tokens, "prompt")
    plan = await plan_for(m, req.model, req.composition, text)
    adapter, info = await serve_plan(m, plan)
    return await _respond(m, req, prompt_ids, params, adapter, info, chat=False, echo=text if req.echo else "")


async def _respond(m, req, prompt_ids, params, adapter, info: MosaicInfo, *, chat: bool, echo: str = ""):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model = req.model
    mosaic = info.model_dump(mode="json", exclude_none=True)
    target = {"base": m.base_id, "composition": "composition"}.get(info.plan) or info.skills[0].split("@")[0]
    stream = _observed(m.engine.generate(prompt_ids, params, adapter), info.plan, target)
    if not req.stream:
        text, last = echo, None
        async for chunk in stream:
            text += chunk.text
            last = chunk
        assert last is not None
        usage = _usage(last)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage, "mosaic": mosaic})
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return EventSourceResponse(_sse(rid, created, model, stream, chat, mosaic, include_usage, echo), ping=15)


async def _observed(stream: AsyncIterator[Chunk], plan: str, target: str) -> AsyncIterator[Chunk]:
    """Count the request, its tokens and its time to the last token, whatever the response shape."""
    t0 = time.monotonic()
    outcome, last = "error", None
    try:
        async for chunk in stream:
            last = chunk
            yield chunk
        outcome = "ok"
    finally:
        seconds = time.monotonic() - t0
        metrics.REQUESTS.labels(plan=plan, outcome=outcome).inc()
        metrics.LATENCY.labels(plan=plan).observe(seconds)
        metrics.TARGET_REQUESTS.labels(target=target, outcome=outcome).inc()
        metrics.TARGET_LATENCY.labels(target=target).observe(seconds)
        if last is not None:
            metrics.TARGET_TOKENS.labels(target=target, kind="prompt").inc(last.prompt_tokens)
            metrics.TARGET_TOKENS.labels(target=target, kind="completion").inc(last.completion_tokens)


def _usage(c: Chunk) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens}


async def _sse(rid, created, model, stream: AsyncIterator[Chunk], chat: bool, mosaic: dict, include_usage: bool, echo: str):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict | None, **extra) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice] if choice else [], **extra}
        return json.dumps(body)

    def choice(text: str, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    last = None
    try:
        yield event(choice(echo, None, first=True), mosaic=mosaic)
        async for chunk in stream:
            last = chunk
            if chunk.text or chunk.finish_reason:
                yield event(choice(chunk.text, chunk.finish_reason))
        if include_usage and last is not None:
            yield event(None, usage=_usage(last))
    except MosaicError as exc:
        yield json.dumps(error_payload(exc))
    yield "[DONE]"


class RouteRequest(BaseModel):
    prompt: str | None = Field(default=None, description="the text to route")
    messages: list[ChatMessage] | None = Field(default=None, description="or chat messages (the last user turn is routed)")
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
    text = req.prompt if req.prompt is not None else next((x.text() for x in reversed(req.messages) if x.role == "user"), "")
    limits.check_prompt_chars(m.settings, [text], "prompt" if req.prompt is not None else "messages")
    if req.composition is not None or req.model not in (None, "auto"):
        return await plan_for(m, req.model or "auto", req.composition, text)
    return await m.route(text)
