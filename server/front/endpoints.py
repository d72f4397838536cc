"""The OpenAI endpoints Mosaic serves through vLLM: for each, vLLM's protocol model and serving method, and
what Mosaic reads of a request (its prompt text, and the text the router sees); and the request bodies
published in the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from server.core.protocol import content_text
from server.core.state import Service

# --- what each endpoint reads ----------------------------------------------------------------------

def message_dicts(items: Any) -> list[dict]:
    """Chat messages as dicts, whether parsed (vLLM's models) or raw; anything else left out."""
    if not isinstance(items, list):
        return []
    return [x.model_dump() if isinstance(x, BaseModel) else x for x in items if isinstance(x, (dict, BaseModel))]


def last_user(items: Any) -> str:
    """The text of the last user turn ("" if none)."""
    return next((content_text(x.get("content")) for x in reversed(message_dicts(items)) if x.get("role") == "user"), "")


def _all_messages(items: Any) -> list[str]:
    return [content_text(x.get("content")) for x in message_dicts(items)]


def _prompts(service: Service, prompt: Any) -> list[str]:
    """The text of a completions prompt: a string, several strings, token ids, or several lists of them."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    tok = service.engine.tokenizer()
    vocab = len(tok) if tok is not None else 0
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and tok is not None:
            out.append(tok.decode([t for t in p if isinstance(t, int) and 0 <= t < vocab]))
    return out


def _prompt_strings(service: Service, prompt: Any) -> list[str]:
    """The text a completions prompt sends as text (the character limit; its token ids are counted as tokens)."""
    if isinstance(prompt, str):
        return [prompt]
    return [p for p in prompt or [] if isinstance(p, str)]


def _input_texts(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else _all_messages(value)


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI route: vLLM's protocol model and serving method, and what Mosaic reads of the request."""

    serving: str  # the attribute of vLLM's serving state
    method: str
    protocol: Callable[[dict], type[BaseModel]]  # the request model for a body
    texts: Callable[[Service, Any], list[str]]  # all prompt text (the character limit)
    routed: Callable[[Service, Any], str]  # what the router and context-aware weights read
    dump: dict = field(default_factory=dict)  # vLLM's model_dump arguments for the response
    events: Callable | None = None  # turns a stream of event objects into SSE text (Responses API)
    generates: bool = True  # False: no tokens are generated (nothing to bound by MOSAIC_MAX_REQUEST_TOKENS)


def _protocols():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )

    return {
        "chat": Endpoint("openai_serving_chat", "create_chat_completion", lambda b: ChatCompletionRequest,
                         lambda service, r: _all_messages(r.messages), lambda service, r: last_user(r.messages)),
        "completion": Endpoint("openai_serving_completion", "create_completion", lambda b: CompletionRequest,
                               lambda service, r: _prompt_strings(service, r.prompt),
                               lambda service, r: "\n".join(_prompts(service, r.prompt))),
        "responses": Endpoint("openai_serving_responses", "create_responses", lambda b: ResponsesRequest,
                              lambda service, r: _input_texts(r.input),
                              lambda service, r: r.input if isinstance(r.input, str) else last_user(r.input),
                              dump={"mode": "json", "by_alias": True}, events=_convert_stream_to_sse_events),
        "tokenize": Endpoint("serving_tokenization", "create_tokenize",
                             lambda b: TokenizeChatRequest if "messages" in b else TokenizeCompletionRequest,
                             lambda service, r: _all_messages(r.messages) if hasattr(r, "messages") else [r.prompt],
                             lambda service, r: last_user(r.messages) if hasattr(r, "messages") else r.prompt,
                             generates=False),
        "detokenize": Endpoint("serving_tokenization", "create_detokenize", lambda b: DetokenizeRequest,
                               lambda service, r: [], lambda service, r: "", generates=False),
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
