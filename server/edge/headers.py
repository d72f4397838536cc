"""Headers every answer of the server carries: no page of another site may frame it.

A framed console would make its own same-origin API calls (which pass the loopback rule of a server
without keys) on a visitor's clicks, so every response, errors and mounted apps included, says
``X-Frame-Options: DENY`` and ``Content-Security-Policy: frame-ancestors 'none'``. A response with no
policy of its own gets :data:`DEFAULT_CSP` (nothing loads from it: right for JSON, text and files);
the HTML pages set theirs (:data:`CONSOLE_CSP`, :func:`page_csp`), and one without ``frame-ancestors``
gets it added.
"""

from __future__ import annotations

import base64
import hashlib
import re

FRAME_ANCESTORS = "frame-ancestors 'none'"
DEFAULT_CSP = f"default-src 'none'; {FRAME_ANCESTORS}"
_PAGE_BASE = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'"
# the console (server/ui): its own scripts and styles only, no inline code
CONSOLE_CSP = f"{_PAGE_BASE}; {FRAME_ANCESTORS}"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def page_csp(html: str, *, inline_styles: bool = False, workers: bool = False) -> str:
    """A policy for an HTML page built by a library (the API docs): scripts from this origin plus the
    page's own inline scripts, allowed by their sha256 and nothing else inline."""
    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
              for s in _INLINE_SCRIPT.findall(html)]
    parts = [_PAGE_BASE, " ".join(["script-src 'self'", *hashes])]
    if inline_styles:
        parts.append("style-src 'self' 'unsafe-inline'")  # the docs' UIs set styles at run time
    if workers:
        parts.append("worker-src 'self' blob:")
    return "; ".join([*parts, FRAME_ANCESTORS])


def _with_frame_rules(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != b"x-frame-options"]
    out.append((b"x-frame-options", b"DENY"))
    csp = [i for i, (k, _) in enumerate(out) if k.lower() == b"content-security-policy"]
    if not csp:
        out.append((b"content-security-policy", DEFAULT_CSP.encode()))
    for i in csp:
        if b"frame-ancestors" not in out[i][1]:
            out[i] = (out[i][0], out[i][1].rstrip(b"; ") + b"; " + FRAME_ANCESTORS.encode())
    return out


def forbid_framing(response):
    """``response`` (a Starlette response) with the framing rules, for answers made outside the app's
    middleware (the Ray ingress's own)."""
    response.raw_headers[:] = _with_frame_rules(list(response.raw_headers))
    return response


class NoFraming:
    """ASGI middleware: the framing rules on every HTTP response that passes through it (placed outside
    everything else, see server/api/app.py, so 401s, 413s, 500s and mounted apps get them too)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_frame_rules(list(message.get("headers", [])))}
            await send(message)

        await self.app(scope, receive, send_with_headers)
