"""One inference request, end to end: parsed and checked (server/front/parse.py), planned and its adapter
built (server/core/planner.py), handed to vLLM's serving object with that adapter (:class:`LoraNames`
lends vLLM a name for it for the duration of the call), and answered (server/front/response.py).
The reference engine (``MOSAIC_ENGINE=hf``) answers through server/front/reference.py instead."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response

from lora.errors import InvalidRequestError, NotFoundError, UnavailableError
from router.plan import Plan
from server.core.engine import EngineAdapter
from server.core.planner import PLANNED, plan_for, serve_plan
from server.core.protocol import MosaicInfo
from server.core.state import Service
from server.edge import auth
from server.edge.disconnect import ClientGone, unless_disconnected
from server.front import reference
from server.front.endpoints import endpoint
from server.front.parse import Refused, check_limits, parse
from server.front.response import Observation, error_json, respond, vllm_error

PLAN_HEADER = "x-mosaic-plan"


def state(request: Request) -> Service:
    return request.app.state.mosaic


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
    """Serve one request to the endpoint ``kind`` (see server/front/endpoints.py)."""
    service = state(request)
    ep = endpoint(kind)
    try:
        req, composition = await parse(request, ep, service.settings)
    except Refused as exc:
        return error_json(exc.error)
    if not service.engine.ready():
        raise UnavailableError("the engine is not ready yet (it is starting or has failed)")
    check_limits(service, ep, req, request.state.sent_fields)
    client_model = req.model or service.base_id  # the name the response reports
    try:  # a composition may take a while: if the client leaves first, its work is abandoned
        adapter, info = await unless_disconnected(request, planned(service, request, client_model, composition,
                                                                   ep.routed(service, req)))
    except ClientGone:
        return Response(status_code=499)
    # the adapter holds its folder on disk while it lives (server/core/folders.py): kept with the request, it lives
    # until the response has been sent, a stream's last event included (the engine reads the folder then)
    request.state.adapter = adapter
    mosaic = auth.shown(service, request.scope, info.model_dump(mode="json", exclude_none=True))  # scores: readers'
    headers = {PLAN_HEADER: json.dumps(mosaic, separators=(",", ":"))}
    observed = Observation(info.plan, _target(service, info))
    if service.engine.serving is None:
        observed.hide_usage = ask_usage(req)
        try:
            result = await reference.handle(service, kind, req, adapter, client_model)
        except Exception:
            observed.done("error")
            raise
        return respond(result, ep, client_model, client_model, mosaic, headers, observed)
    serving = service.engine.serving
    from vllm.entrypoints.serve.utils.api_utils import with_cancellation

    handler = getattr(getattr(serving, ep.serving), ep.method)
    with (LORA_NAMES.hold(serving.openai_serving_models, adapter) if adapter else _no_lora(service)) as served_name:
        if req.model is not None or adapter is not None:
            req.model = served_name
        observed.metadata_from = request.state  # vLLM records every stream's usage there, asked for or not
        try:
            # vLLM's own routes' wrapper: the work is cancelled if the client disconnects first (result None)
            result = await with_cancellation(handler)(req, request)
        except Exception as exc:  # vLLM's own server turns these into responses in its exception handlers
            result = vllm_error(exc)
    return respond(result, ep, served_name, client_model, mosaic, headers, observed)


async def planned(service: Service, request: Request, model: str, composition, text: str):
    """The plan's adapter and what serves it. ``auto`` may choose a skill that is deleted before its adapter
    is built: the router then decides again, once, on the library as it is now (the client named a valid
    model; a 404 for a skill it never named would be wrong)."""
    namespace = auth.namespace(request)
    if (handed := request.scope.get(PLANNED)) is not None:  # planned by the Ray ingress for this very request
        plan = Plan.model_validate(handed)
    else:
        plan = await plan_for(service, model, composition, text, namespace)
    try:
        return await serve_plan(service, plan)
    except NotFoundError:
        if model != "auto" or composition is not None:
            raise
    return await serve_plan(service, await plan_for(service, model, composition, text, namespace))


def ask_usage(req) -> bool:
    """On the reference engine, a stream that did not ask for usage asks for it here, so that its tokens
    are counted (``mosaic_target_tokens_total``); True when the usage event is Mosaic's, to be kept from
    the client. (vLLM's serving layer records a stream's usage whether or not it was asked for.)"""
    if not getattr(req, "stream", False) or "stream_options" not in type(req).model_fields:
        return False
    options = req.stream_options
    if options is not None and options.include_usage:
        return False
    from vllm.entrypoints.generate.base.protocol import StreamOptions

    req.stream_options = StreamOptions(include_usage=True)  # continuous stats stay off: one usage event, the last
    return True


@contextmanager
def _no_lora(service: Service):
    yield service.base_id


def _target(service: Service, info: MosaicInfo) -> str:
    if info.plan == "base":
        return service.base_id
    if info.plan == "composition":
        return "composition"
    return info.skills[0].split("@")[0]


def responses_serving(request: Request):
    """vLLM's Responses serving object, for its stored responses (refused on the reference engine)."""
    service = state(request)
    if service.engine.serving is None:
        raise InvalidRequestError("the reference engine (MOSAIC_ENGINE=hf) keeps no responses: use the vLLM engine")
    if not service.engine.ready():
        raise UnavailableError("the engine is not ready yet (it is starting or has failed)")
    return service.engine.serving.openai_serving_responses
