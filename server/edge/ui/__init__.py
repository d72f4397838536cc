"""The skill-library console at ``/ui``: static HTML, CSS and plain JavaScript shipped in the package and
served by the same server (no Node toolchain, no CDN: the page works offline). The page holds no data of
its own: it calls the HTTP API from the browser with the key the user gives it (kept in the tab's session
storage), so every action needs the scope its API call needs; the files themselves are open.

The page may not be framed (server/edge/headers.py sends ``frame-ancestors 'none'`` and ``X-Frame-Options``
on every answer; the script also refuses to run in a frame) and runs under a strict policy
(:data:`~server.edge.headers.CONSOLE_CSP`: its own scripts and styles only, no inline code). Its
irreversible actions (deleting, compressing the library) ask ``window.confirm`` first: a dialog the browser
draws above every page, naming what will change, that another page can neither cover nor answer.

``install(app)`` adds ``/ui`` (the page), ``/ui/methods.json`` (the merge methods the compose forms offer:
code, not library data) and the static files under ``/ui/static``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from composer.registry import METHODS
from server.edge.headers import CONSOLE_CSP

STATIC = Path(__file__).parent / "static"
STATIC_PATH = "/ui/static"  # open in server/edge/auth.py's MOUNT_SCOPES: the files hold no data

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def console() -> FileResponse:
    return FileResponse(STATIC / "index.html",
                        headers={"cache-control": "no-cache", "content-security-policy": CONSOLE_CSP})


@router.get("/ui/")
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/methods.json")
async def methods() -> JSONResponse:
    """The registered merge methods: name, space, reference, description and parameters (with defaults)."""
    return JSONResponse([
        {"name": m.name, "space": m.space, "reference": m.reference, "description": m.description,
         "max_inputs": m.max_inputs,
         "params": {k: {"default": p.default, "help": p.help} for k, p in m.params.items()}}
        for m in sorted(METHODS.values(), key=lambda m: m.name)
    ])


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC), name="ui-static")
