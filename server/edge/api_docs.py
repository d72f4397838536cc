"""The API's interactive docs at ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served from this server:
their JavaScript and CSS come from the pinned ``fastapi-offline`` package (swagger-ui-dist and ReDoc's
standalone bundle), so nothing loads from another site into the origin of the admin API, and each page
carries a Content-Security-Policy (scripts from this origin and the page's own hashed inline script).

The pages and ``/docs/assets/*`` are open, like the console's files: they hold no data; the API the
docs call keeps its own rules (server/edge/auth.py).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from server.edge.headers import page_csp

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_PATH = "/docs/assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

router = APIRouter(include_in_schema=False)


def _openapi_url(request: Request) -> str:
    return request.scope.get("root_path", "") + request.app.openapi_url


def _assets(request: Request) -> str:
    return request.scope.get("root_path", "") + ASSETS_PATH


def _with_csp(page: HTMLResponse, **allow: bool) -> HTMLResponse:
    page.headers["content-security-policy"] = page_csp(bytes(page.body).decode(), **allow)
    page.headers["cache-control"] = "no-cache"
    return page


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    assets = _assets(request)
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request), title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js", swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI's default sends the spec to an outside validator
    )
    return _with_csp(page)


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    assets = _assets(request)
    page = get_redoc_html(
        openapi_url=_openapi_url(request), title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )
    return _with_csp(page, inline_styles=True, workers=True)


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no docs asset named {name!r}")
    return FileResponse(ASSETS_DIR / name)


def install(app: FastAPI) -> None:
    """Add the docs pages; the app is created with ``docs_url=None, redoc_url=None``."""
    app.include_router(router)
