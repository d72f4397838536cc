"""Who may do what over HTTP: API keys (stored hashed in Redis: adapter_store.keys) and the rules
while there are none.

Scopes: ``admin`` changes the library (upload, delete, compose, compress, optimise); ``read`` reads it
(adapter listings and details, downloads, ``/metrics``); ``inference`` generates. ``admin`` implies the
other two.

The server is **locked** once keys are in use: ``MOSAIC_API_KEY`` is set, ``MOSAIC_REQUIRE_INFERENCE_KEY``
is set, or a key was ever created (revoking the last key does not unlock it, and neither does a Redis that
forgot it: Redis and the data dir both remember, adapter_store/keys.py).
- Locked: ``admin`` and ``read`` need a key with that scope; inference needs one when
  ``MOSAIC_REQUIRE_INFERENCE_KEY`` is set.
- Not locked: ``admin`` and ``read`` are open to requests from this machine only (a loopback client,
  addressed by a loopback host name, not sent by another origin's web page), and ``mosaic serve``
  refuses to bind another address in that state; or to everyone when ``MOSAIC_OPEN_ADMIN=true`` was
  chosen. Inference is open.

Each route declares its scope with :func:`require_scope`; :class:`AuthGate` checks it before any of the
request body is read (FastAPI reads a form body before it runs a route's dependencies).

**Namespaces**: a key created with ``--namespace team`` reaches only skills named ``team/…`` (and the
base model): uploads, compositions (name and inputs), details, downloads, deletes and inference check
every name they touch (:func:`check_names`, 403 otherwise); listings show only the namespace; and what
spans the whole library is refused (:func:`whole_library`): compression, ``/metrics``, and ``auto``
routing (the router chooses among every skill: such a key sends a composition with ``weights: "auto"``
over its own skills instead). The root key and keyless access are not limited. Where inference is open
(no ``MOSAIC_REQUIRE_INFERENCE_KEY``) a key is not needed, but one that is sent still limits the request.

**What inference shows of the library** to a caller who may not read it (:func:`may_read`: no ``read``
scope, e.g. an anonymous client of a locked server, or of a keyless one from another machine): ``/v1/models``
lists the base model and ``auto`` but no skill, and a plan (``/v1/route``, the ``mosaic`` field and
``x-mosaic-plan`` header of an answer) says what serves the request, not the router's per-skill scores,
similarities and α (:func:`shown`): those name skills and measure a prompt against their example prompts.
A skill is still served to whoever names it.
"""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

import redis
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.routing import Match, Mount

from adapter_store.keys import KEY_PREFIX
from adapter_store.validation import in_namespace
from lora.errors import AuthError, ForbiddenError, MosaicError, UnavailableError
from server.edge.errors import mosaic_error_response

CHECKED = "mosaic.auth"  # set in the ASGI scope once the gate has checked a request
NAMESPACE = "mosaic.namespace"  # the ASGI scope's record of the key's namespace (absent: not limited)


def is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def _presented_key(headers) -> str:
    given = headers.get("authorization", "")
    return given[7:].strip() if given.lower().startswith("bearer ") else headers.get("x-api-key", "")


def locked(service) -> bool:
    return bool(service.settings.api_key) or service.settings.require_inference_key or service.keys.locked()


def _same_machine(headers, client_host: str | None) -> bool:
    """A request from this machine, addressed to this machine by a loopback name, and not sent by a web
    page of another origin (a browser's cross-site form post or a DNS-rebinding page would otherwise
    count as local)."""
    if not is_loopback(client_host):
        return False
    host = headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[: host.find("]") + 1]
    if not is_loopback(name):
        return False
    origin = headers.get("origin")
    if origin is not None and not is_loopback(urlsplit(origin).hostname):
        return False
    return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def check(service, scope: str, headers, client_host: str | None) -> str | None:
    """Raise AuthError (401) or ForbiddenError (403) unless the request may use ``scope``; returns the
    namespace the request is limited to (None: not limited)."""
    if scope == "inference" and not service.settings.require_inference_key:
        return _offered_namespace(service, headers)
    if not locked(service):
        if service.settings.open_admin or _same_machine(headers, client_host):
            return None
        raise AuthError(f"this server has no API keys yet, and '{scope}' is open only to clients on this machine "
                        "(MOSAIC_OPEN_ADMIN=true opens it to everyone): create a key with `mosaic keys create`")
    token = _presented_key(headers)
    if not token:
        raise AuthError(f"this endpoint needs an API key with the '{scope}' scope: send 'Authorization: Bearer <key>'")
    root = service.settings.api_key
    if root and secrets.compare_digest(token.encode(), root.encode()):
        return None
    key = service.keys.lookup(token)
    if key is None:
        raise AuthError("the API key is unknown or revoked")
    if scope not in key.scopes and "admin" not in key.scopes:
        raise ForbiddenError(f"the API key lacks the '{scope}' scope (it has {key.scopes})")
    return key.namespace


def _offered_namespace(service, headers) -> str | None:
    """Open inference needs no key, but a key that is sent still limits the request to its namespace (a
    token that is no key of Mosaic's, such as an OpenAI client's placeholder, is ignored)."""
    token = _presented_key(headers)
    if not token.startswith(KEY_PREFIX):
        return None
    try:
        key = service.keys.lookup(token)
    except (redis.RedisError, OSError):  # Redis away: open inference keeps serving what it can, unlimited as a keyless call
        return None
    return key.namespace if key is not None else None


def may_read(service, scope) -> tuple[bool, str | None]:
    """Whether the request (its ASGI ``scope``) may read the library, as a ``read`` route would let it, and
    the namespace its reading is limited to. Inference routes ask, to decide what of the library to show."""
    from starlette.datastructures import Headers

    client = scope.get("client")
    try:
        return True, check(service, "read", Headers(scope=scope), client[0] if client else None)
    except (MosaicError, redis.ConnectionError, redis.TimeoutError):
        return False, None


ROUTER_DETAIL = ("scores", "similarity", "alpha")  # a plan's numbers per skill


def shown(service, scope, fields: dict) -> dict:
    """``fields`` (a plan, or an answer's ``mosaic`` field) as the caller may see them: whole for a caller who
    may read the library; for another, without the router's per-skill numbers and the reason that quotes them."""
    if not any(fields.get(k) for k in ROUTER_DETAIL) or may_read(service, scope)[0]:
        return fields
    return {**{k: v for k, v in fields.items() if k not in ROUTER_DETAIL},
            "reason": "chosen by the router (its scores are shown to callers with the 'read' scope)"}


def namespace(request: Request) -> str | None:
    """The namespace this request's key is limited to, if any."""
    return request.scope.get(NAMESPACE)


def check_names(request: Request, names, param: str = "name") -> None:
    """403 unless every skill name (or name@N) in ``names`` is in the request's namespace."""
    ns = namespace(request)
    if ns is None:
        return
    if outside := sorted({n for n in names if not in_namespace(n, ns)}):
        raise ForbiddenError(f"this API key reaches only skills named '{ns}/…', not {', '.join(map(repr, outside))}",
                             param=param)


def whole_library(request: Request, what: str) -> None:
    """403 when the request's key is limited to a namespace: ``what`` spans the whole library."""
    if (ns := namespace(request)) is not None:
        raise ForbiddenError(f"this API key is limited to the namespace '{ns}'; {what} spans the whole library")


class require_scope:  # noqa: N801 - used as a FastAPI dependency: Depends(require_scope("admin"))
    """A route's scope. :class:`AuthGate` checks it before the body is read; the dependency checks
    again only where the gate did not run (an app assembled without it)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(self, request: Request) -> None:
        if not request.scope.get(CHECKED):
            ns = check(request.app.state.mosaic, self.scope, request.headers,
                       request.client.host if request.client else None)
            if ns is not None:
                request.scope[NAMESPACE] = ns


# mounted apps have no dependencies to declare a scope with; None: open (the console's static files hold no
# data: what the page shows comes from API calls, each checked here with the key the user gives it)
MOUNT_SCOPES = {"/metrics": "read", "/ui/static": None}


def route_scope(app, scope) -> tuple[str | None, bool]:
    """The scope the route that will answer this request declares (None: open, e.g. /health), matched
    as the router matches it (root path included), and whether that route is a mounted app."""
    for route in app.router.routes:
        if route.matches(scope)[0] != Match.FULL:
            continue
        if isinstance(route, APIRoute):
            for dep in route.dependant.dependencies:
                if isinstance(dep.call, require_scope):
                    return dep.call.scope, False
            return None, False
        if isinstance(route, Mount):
            return MOUNT_SCOPES.get(route.path, "admin"), True  # an unlisted mount is not left open
        return None, False
    return None, False


def refusal(fastapi_app, scope):
    """The answer to a request the key it presents may not make (401/403, or 503 when Redis is away),
    or None after recording in ``scope`` that the request was checked and its namespace. Used by
    :class:`AuthGate` and by the Ray ingress (server/ray/app.py), before either reads the body."""
    from starlette.datastructures import Headers

    if scope.get(CHECKED):  # checked where the scope was built (the Ray ingress, for the replica it calls)
        return None
    wanted, is_mount = route_scope(fastapi_app, scope)
    if wanted is None:
        return None
    service = fastapi_app.state.mosaic
    client = scope.get("client")
    try:
        ns = check(service, wanted, Headers(scope=scope), client[0] if client else None)
        if ns is not None and is_mount:
            raise ForbiddenError(f"this API key is limited to the namespace '{ns}'; {scope['path']} spans "
                                 "the whole library")
    except (redis.ConnectionError, redis.TimeoutError):
        return mosaic_error_response(UnavailableError("the skill registry (Redis) is unavailable; try again shortly"))
    except MosaicError as exc:
        return mosaic_error_response(exc)
    scope[CHECKED] = True
    if ns is not None:
        scope[NAMESPACE] = ns
    return None


class AuthGate:
    """ASGI middleware: the route's scope is checked before the app (or FastAPI's form parsing) reads
    the body, so an unauthorised upload costs the server nothing."""

    def __init__(self, app, fastapi_app) -> None:
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (refused := refusal(self.fastapi_app, scope)) is not None:
            return await refused(scope, receive, send)
        await self.app(scope, receive, send)
