"""API-key checks for the HTTP API (keys live hashed in Redis: adapter_store.keys)."""

from __future__ import annotations

import secrets

from fastapi import Request

from adapter_store.errors import AuthError, ForbiddenError


def _presented_key(request: Request) -> str:
    given = request.headers.get("authorization", "")
    return given[7:].strip() if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")


def require_scope(scope: str):
    """A dependency: the request needs a key with ``scope`` once keys are in use.

    Keys are in use when MOSAIC_API_KEY is set (that key has every scope) or any key was created
    with `mosaic keys create`. Admin endpoints are open only while neither is the case; inference
    needs a key only when MOSAIC_REQUIRE_INFERENCE_KEY is set.
    """

    def check(request: Request) -> None:
        m = request.app.state.mosaic
        if scope == "inference" and not m.settings.require_inference_key:
            return
        root = m.settings.api_key
        stored = m.keys.any()
        if not root and not stored:
            if scope == "inference":
                raise AuthError("inference needs an API key, but none exists yet: create one with `mosaic keys create`")
            return
        token = _presented_key(request)
        if not token:
            raise AuthError(f"this endpoint needs an API key with the '{scope}' scope: send 'Authorization: Bearer <key>'")
        if root and secrets.compare_digest(token.encode(), root.encode()):
            return
        scopes = m.keys.scopes(token)
        if scopes is None:
            raise AuthError("the API key is unknown or revoked")
        if scope not in scopes:
            raise ForbiddenError(f"the API key lacks the '{scope}' scope (it has {scopes})")

    return check
