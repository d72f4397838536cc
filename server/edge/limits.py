"""Request limits (settings ``MOSAIC_MAX_*``), each checked before any work is done and refused with a 4xx."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora.errors import InvalidRequestError
from server.core.settings import Settings
from server.edge.errors import error_response


def check_prompt_chars(settings: Settings, texts: Iterable[str], param: str) -> None:
    """A character cap checked before tokenizing, so a huge body costs no tokenizer time."""
    n = sum(len(t) for t in texts)
    if n > settings.max_prompt_chars:
        raise InvalidRequestError(
            f"the prompt has {n} characters; the limit is {settings.max_prompt_chars} (setting MOSAIC_MAX_PROMPT_CHARS)",
            param=param,
        )


def check_prompt_tokens(settings: Settings, n: int, param: str) -> None:
    """The prompt must leave room for one generated token and stay under ``max_prompt_tokens``."""
    limit = min(settings.max_prompt_tokens, settings.max_model_len - 1)
    if n > limit:
        raise InvalidRequestError(
            f"the prompt has {n} tokens; the limit is {limit} (context {settings.max_model_len}, "
            f"setting MOSAIC_MAX_PROMPT_TOKENS={settings.max_prompt_tokens})", param=param,
        )


def check_max_tokens(settings: Settings, prompt_tokens: int, max_tokens: int | None) -> int:
    """The number of tokens to generate: the request's, or all the room left; 400 when it asks for more."""
    room = min(settings.max_model_len - prompt_tokens, settings.max_tokens_limit)
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequestError(
            f"max_tokens={max_tokens} is more than this request allows ({room}: context {settings.max_model_len}, "
            f"prompt {prompt_tokens} tokens, setting MOSAIC_MAX_TOKENS_LIMIT={settings.max_tokens_limit})",
            param="max_tokens",
        )
    return max_tokens or room


def check_raw_prompts(settings: Settings, body: dict) -> None:
    """A completions or tokenize ``prompt`` counted as sent, before vLLM's model validates it and before any
    token id is decoded: at most ``max_prompts`` prompts, each list of token ids at most the prompt token limit."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        check_prompt_chars(settings, [prompt], "prompt")
    if not isinstance(prompt, list) or not prompt:
        return
    prompts = [prompt] if not isinstance(prompt[0], (str, list)) else prompt
    check_prompt_chars(settings, [p for p in prompts if isinstance(p, str)], "prompt")
    if len(prompts) > settings.max_prompts:
        raise InvalidRequestError(
            f"the request has {len(prompts)} prompts; the limit is {settings.max_prompts} (setting MOSAIC_MAX_PROMPTS)",
            param="prompt")
    for p in prompts:
        if isinstance(p, list):
            check_prompt_tokens(settings, len(p), "prompt")


def check_raw_messages(settings: Settings, body: dict) -> None:
    """Chat ``messages`` (or a Responses ``input`` list) counted as sent, with their content parts, before
    vLLM's model validates each one."""
    field = "messages" if "messages" in body else "input"
    items = body.get(field)
    if not isinstance(items, list):
        return
    contents = [x.get("content") for x in items if isinstance(x, dict)]
    parts = [p for c in contents if isinstance(c, list) for p in c]
    n = len(items) + len(parts)
    if n > settings.max_messages:
        raise InvalidRequestError(
            f"{field} has {n} messages and content parts; the limit is {settings.max_messages} (setting "
            "MOSAIC_MAX_MESSAGES)", param=field)
    texts = [c for c in contents if isinstance(c, str)] + [p["text"] for p in parts if isinstance(p, dict)
                                                             and isinstance(p.get("text"), str)]
    check_prompt_chars(settings, texts, field)  # the plain shapes, before validation; the rest after it


def check_token_ids(settings: Settings, body: dict, field: str = "tokens") -> None:
    """A list of token ids to decode (``/detokenize``) is at most a context long."""
    ids = body.get(field)
    if isinstance(ids, list) and len(ids) > settings.max_model_len:
        raise InvalidRequestError(
            f"{field} has {len(ids)} token ids; the limit is the context, {settings.max_model_len} (setting "
            "MOSAIC_MAX_MODEL_LEN)", param=field)


def check_generation(settings: Settings, prompts: int, choices: int, max_tokens: int) -> None:
    """What one request may generate: at most ``max_choices`` choices (``n``, also the beam width) and at most
    ``max_request_tokens`` tokens over all prompts and choices."""
    if choices > settings.max_choices:
        raise InvalidRequestError(
            f"n={choices} is more than the server allows ({settings.max_choices}, setting MOSAIC_MAX_CHOICES)", param="n")
    total = prompts * choices * max_tokens
    if total > settings.max_request_tokens:
        raise InvalidRequestError(
            f"this request may generate {total} tokens ({prompts} prompt(s) × n={choices} × max_tokens={max_tokens}); "
            f"the limit is {settings.max_request_tokens} (setting MOSAIC_MAX_REQUEST_TOKENS)",
            param="n" if choices > 1 else "max_tokens")


class BodyTooLarge(StarletteHTTPException):
    """A body over its limit; FastAPI re-raises HTTP exceptions met while reading a body, so it leaves as 413."""

    def __init__(self, size: int, limit: int, setting: str, what: str = "bytes") -> None:
        super().__init__(413, f"request body of {size}+ {what} exceeds the limit of {limit} {what} (setting {setting})")


class BodySizeLimit:
    """ASGI middleware: a request body over its limit is refused with 413 before it is read.

    Uploads (``POST /v1/adapters``) get ``max_upload_mb`` plus room for the multipart envelope;
    every other request gets ``max_request_mb``. A declared Content-Length is checked up front,
    a chunked body is counted as it arrives."""

    def __init__(self, app, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        meter = BodyMeter(self.settings, scope)
        if (refused := meter.declared()) is not None:
            return await refused(scope, receive, send)

        async def counted():
            message = await receive()
            if message["type"] == "http.request" and (over := meter.add(message.get("body", b""))) is not None:
                raise over
            return message

        await self.app(scope, counted, send)


class BodyMeter:
    """One request's body measured as it arrives: its bytes against the route's limit (``max_upload_mb`` or
    ``max_request_mb``) and, for a JSON body, its values against ``max_json_values`` (an upper bound
    counted as commas and brackets at memchr speed: parsing is what would cost)."""

    def __init__(self, settings: Settings, scope) -> None:
        self.settings, self.scope = settings, scope
        self.limit, self.setting = body_limit(settings, scope)
        # JSON or not, a body is counted unless it is a form (an upload): a request with two content types, or
        # none (FastAPI parses that as JSON), must not slip past the count
        self.json = not _media_type(scope).startswith(("multipart/", "application/x-www-form-urlencoded"))
        self.bytes = self.values = 0

    def declared(self):
        """The 413 answer when the declared Content-Length is already over the limit (None otherwise)."""
        return declared_too_large(self.scope, self.limit, self.setting)

    def add(self, chunk: bytes) -> BodyTooLarge | None:
        """The error once the body is over a limit, counting ``chunk`` (None while it is within them)."""
        self.bytes += len(chunk)
        if self.bytes > self.limit:
            return BodyTooLarge(self.bytes, self.limit, self.setting)
        if self.json:
            self.values += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
            if self.values > self.settings.max_json_values:
                return BodyTooLarge(self.values, self.settings.max_json_values, "MOSAIC_MAX_JSON_VALUES",
                                    "JSON values (commas and brackets)")
        return None


def _media_type(scope) -> str:
    """The request's media type as Starlette reads it (the first Content-Type header)."""
    return Headers(scope=scope).get("content-type", "").split(";", 1)[0].strip().lower()


def body_limit(settings: Settings, scope) -> tuple[int, str]:
    """The most bytes this request's body may have, and the setting that says so."""
    if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/adapters":
        return settings.max_upload_mb * 2**20 + 2**20, "MOSAIC_MAX_UPLOAD_MB"  # room for the multipart envelope
    return settings.max_request_mb * 2**20, "MOSAIC_MAX_REQUEST_MB"


def declared_too_large(scope, limit: int, setting: str):
    """A 413 when the request's Content-Length is over ``limit`` (None otherwise)."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        return too_large(int(declared), limit, setting)
    return None


def too_large(size: int, limit: int, setting: str):
    """The 413 for a body of ``size``+ bytes over ``limit``, in OpenAI's error shape."""
    return refusal(BodyTooLarge(size, limit, setting))


def refusal(exc: BodyTooLarge):
    """``exc`` as its 413 answer, in OpenAI's error shape."""
    return error_response(413, exc.detail, "invalid_request_error", "413")
