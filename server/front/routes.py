"""OpenAI-compatible inference, served by vLLM's own OpenAI serving layer with Mosaic's plan in front:
the routes. Every request to ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/tokenize``
and ``/detokenize`` goes the same way (server/front/serving.py):

1. the body is parsed with vLLM's own protocol model for the endpoint, after Mosaic takes its one
   extension out (``composition``); a field that neither knows is refused with a 400 naming it
   (server/front/parse.py, the endpoints' table in server/front/endpoints.py);
2. Mosaic's limits and the ``model`` (base id, ``name``, ``name@N``, ``auto``) or ``composition`` turn
   into a plan and an adapter folder, materialised and cached by :class:`AdapterCache`
   (server/core/planner.py);
3. vLLM's serving object handles the request with that adapter (:class:`LoraNames` lends vLLM a name
   for it for the duration of the call): sampling, logprobs, structured output, tools, ``n``, echo,
   streaming and its framing, usage and every parameter error are vLLM's own;
4. the response carries the client's ``model`` back, plus Mosaic's ``mosaic`` field: in the body, or on
   the first event of a stream, and always in the ``x-mosaic-plan`` header (compact JSON)
   (server/front/response.py).

The reference engine (``MOSAIC_ENGINE=hf``) has no vLLM serving layer: server/front/reference.py serves its
documented subset behind the same front.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lora.errors import InvalidRequestError
from router.plan import Plan
from server.core.planner import plan_for
from server.core.protocol import RouteRequest
from server.edge import auth, limits
from server.edge.auth import require_scope
from server.front.endpoints import last_user
from server.front.models import model_list
from server.front.response import stored_response
from server.front.serving import responses_serving, serve, state
from server.jobs.library import PageAfter, PageLimit

router = APIRouter(tags=["inference"], dependencies=[Depends(require_scope("inference"))])


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
    serving = responses_serving(request)
    result = await serving.retrieve_responses(response_id, starting_after=starting_after, stream=stream)
    return stored_response(result)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> Response:
    """Cancel a background response that vLLM stores (see ``GET /v1/responses/{response_id}``)."""
    return stored_response(await responses_serving(request).cancel_responses(response_id))


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """vLLM's tokenizer endpoint (a prompt, or chat messages through the chat template)."""
    return await serve(request, "tokenize")


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    """vLLM's detokenizer endpoint."""
    return await serve(request, "detokenize")


@router.get("/v1/models")
async def list_models(request: Request, limit: PageLimit = None, after: PageAfter = None) -> JSONResponse:
    """vLLM's model cards: the base model, the skills (``parent`` = the base id, as vLLM's LoRA cards; listed
    only to callers with ``read``) and ``auto``; Mosaic's own fields under ``mosaic``. ``limit`` and ``after``
    page through the skills."""
    return JSONResponse(await model_list(state(request), request, after, limit))


@router.post("/v1/route", response_model=Plan, tags=["router"])
async def route(req: RouteRequest, request: Request) -> Plan:
    """The router's decision for a prompt, without generating (or, given a context-aware composition
    or the name of a stored one, the weights it would be served with). Its per-skill scores and
    similarities only for callers with ``read``; others see what would serve the prompt."""
    if req.prompt is None and not req.messages:
        raise InvalidRequestError("give a prompt or messages", param="prompt")
    service = state(request)
    text = req.prompt if req.prompt is not None else last_user(req.messages)
    limits.check_prompt_chars(service.settings, [text], "prompt" if req.prompt is not None else "messages")
    if req.composition is not None or req.model not in (None, "auto") or auth.namespace(request) is not None:
        plan = await plan_for(service, req.model or "auto", req.composition, text, auth.namespace(request))
    else:
        plan = await service.route(text)
    return Plan.model_validate(auth.shown(service, request.scope, plan.model_dump()))
