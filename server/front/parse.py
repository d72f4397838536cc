"""A request's way in: its body parsed with vLLM's protocol model for the endpoint (Mosaic's one
extension, ``composition``, taken out first; any other unknown field refused with a 400 naming it),
then Mosaic's limits checked on it."""

from __future__ import annotations

import gc
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError

from composer.spec import Composition
from lora.errors import InvalidRequestError
from server.core.protocol import content_text
from server.core.settings import Settings
from server.core.state import Service
from server.edge import limits
from server.front.endpoints import Endpoint, message_dicts
from server.front.response import vllm_error

MOSAIC_FIELDS = {"composition"}
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def field_names(cls: type[BaseModel]) -> set[str]:
    """The names a body may use for ``cls``'s fields: theirs and their aliases."""
    names = set(cls.model_fields)
    names |= {f.alias for f in cls.model_fields.values() if f.alias}
    return names


async def parse(request: Request, ep: Endpoint, settings: Settings) -> tuple[Any, Composition | None]:
    """The request as vLLM's protocol model, and Mosaic's ``composition``. 400 on anything else.

    Everything that costs in proportion to the body is bounded before it runs: the JSON's values as the
    body arrives (server/edge/limits.py, ``BodySizeLimit``), the prompts, token ids and messages before vLLM's
    model validates them; no token id is decoded here."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise InvalidRequestError("send the request body as JSON (Content-Type: application/json)")
    body = loads(await request.body())
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    limits.check_raw_prompts(settings, body)
    limits.check_raw_messages(settings, body)
    limits.check_token_ids(settings, body)
    cls = ep.protocol(body)
    unknown = sorted(set(body) - field_names(cls) - MOSAIC_FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: Mosaic serves the fields of "
            "vLLM's OpenAI protocol for this endpoint, plus 'composition'", param=unknown[0])
    composition = body.pop("composition", None)
    request.state.sent_fields = frozenset(body)
    return _validate(cls, body, ()), None if composition is None else _validate(Composition, composition, ("composition",))


def loads(raw: bytes) -> Any:
    """A JSON body, parsed with the cyclic garbage collector paused: a body of many small lists or objects
    parses in about half the time (the collector would otherwise scan the growing result again and again)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    finally:
        if paused:
            gc.enable()


def _validate(cls: type[BaseModel], value: Any, loc: tuple):
    try:
        return cls.model_validate(value)
    except ValidationError as exc:  # answered by the 400 handler in server/edge/errors.py
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


def check_limits(service: Service, ep: Endpoint, req: Any, sent: frozenset[str] | None = None) -> None:
    """Mosaic's limits on a parsed request; ``sent``: the fields the client sent (None: all of them). A composition's
    size is the planner's to check (server/core/planner.py), once, on every way in."""
    limits.check_prompt_chars(service.settings, ep.texts(service, req), "prompt" if hasattr(req, "prompt") else "messages")
    if service.engine.serving is not None and service.settings.max_prompt_tokens < service.settings.max_model_len - 1:
        # tighter than the context that vLLM checks itself: count the prompt here
        for n in prompt_token_counts(service, req):
            limits.check_prompt_tokens(service.settings, n, "prompt" if hasattr(req, "prompt") else "messages")
    for name in MAX_TOKENS_FIELDS:  # as sent: a default (completions: 16) is capped by the engine, not refused
        value = vars(req).get(name) if sent is None or name in sent else None
        if isinstance(value, int) and value > service.settings.max_tokens_limit:
            raise InvalidRequestError(
                f"{name}={value} is more than the server allows ({service.settings.max_tokens_limit}, setting "
                "MOSAIC_MAX_TOKENS_LIMIT)", param=name)
    if ep.generates:
        limits.check_generation(service.settings, prompt_count(req), getattr(req, "n", None) or 1,
                                generated_tokens(service.settings, req))


def prompt_count(req: Any) -> int:
    """How many prompts a request generates for (completions may send a list of them)."""
    prompt = getattr(req, "prompt", None) if not hasattr(req, "messages") and not hasattr(req, "input") else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def generated_tokens(settings: Settings, req: Any) -> int:
    """The most tokens one choice may generate: the largest of the request's max_tokens fields (vLLM's chat
    reads max_completion_tokens before max_tokens; a default counts), or, when it has none, what the engine
    gives it (MOSAIC_MAX_TOKENS_LIMIT, within the context)."""
    values = [v for name in MAX_TOKENS_FIELDS if isinstance(v := vars(req).get(name), int)]
    return max(values) if values else min(settings.max_model_len - 1, settings.max_tokens_limit)


def prompt_token_counts(service: Service, req: Any) -> list[int]:
    """Prompt lengths in tokens, by the model's tokenizer (chat: through its chat template)."""
    tok = service.engine.tokenizer()
    if hasattr(req, "messages"):
        messages = [{"role": x.get("role"), "content": content_text(x.get("content"))} for x in message_dicts(req.messages)]
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
