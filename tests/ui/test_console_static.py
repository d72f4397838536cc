"""The console's files without a browser or an engine: /ui and its assets are served to anyone (they hold
no data) while the API behind them still needs a key; every API path the JavaScript calls is a route of
the app (a renamed route fails here, not only in the browser test); every module it imports ships."""

from __future__ import annotations

import re
import uuid

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Match

from composer.registry import METHODS
from server.api.app import create_app
from server.core import engine as engine_module
from server.core.settings import Settings
from server.edge.ui import STATIC
from tests.helpers import LOCAL, LOCAL_URL, TEST_REDIS_URL, drop_prefix

REMOTE = ("203.0.113.7", 50000)  # a client that is not on this machine
SCRIPTS = sorted(STATIC.rglob("*.js"))
# string and template literals that start like an API path: "/v1/…", "/health", "/metrics", "/ui/…"
API_LITERAL = re.compile(r"""["'`](/(?:v1/|health|metrics|ui/|tokenize|detokenize)[^"'`\s]*)["'`]""")


@pytest.fixture
def app_factory(monkeypatch, redis_client):
    async def idle(self):  # the files and routes are what is tested; the engine stays down
        return None

    monkeypatch.setattr(engine_module.HfEngine, "start", idle)
    prefixes = []

    def make(client=LOCAL, **kw):
        prefixes.append(f"mosaic-test-{uuid.uuid4().hex[:10]}")
        settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefixes[-1], **kw)
        return TestClient(create_app(settings), client=client, base_url=LOCAL_URL)

    yield make
    for p in prefixes:
        drop_prefix(redis_client, p)


def _assets() -> list[str]:
    return ["/ui/static/" + p.relative_to(STATIC).as_posix() for p in sorted(STATIC.rglob("*")) if p.is_file()]


@pytest.mark.parametrize("locked", [False, True], ids=["no keys", "MOSAIC_API_KEY set"])
def test_the_console_is_open_and_the_api_behind_it_is_not(app_factory, locked):
    remote = app_factory(client=REMOTE, **({"api_key": "root-key"} if locked else {}))
    with remote:
        page = remote.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/ui/static/app.js">' in page.text and "/ui/static/console.css" in page.text
        assert remote.get("/ui/", follow_redirects=False).headers["location"] == "/ui"
        assets = _assets()
        assert {"/ui/static/app.js", "/ui/static/api.js", "/ui/static/pages/upload.js"} <= set(assets)
        for path in assets:
            r = remote.get(path)
            assert r.status_code == 200 and r.content == (STATIC / path.removeprefix("/ui/static/")).read_bytes(), path
            if path.endswith(".js"):  # browsers refuse a module script served as anything else
                assert "javascript" in r.headers["content-type"], (path, r.headers["content-type"])
        assert remote.get("/ui/methods.json").status_code == 200
        # the data is behind the key, as before
        for r in (remote.get("/v1/adapters"), remote.delete("/v1/adapters/ghost"), remote.get("/metrics/")):
            assert r.status_code == 401, r.text
        assert remote.get("/ui/static/../../admin_api.py").status_code == 404  # no way out of the folder
        if locked:
            ok = remote.get("/v1/adapters", headers={"Authorization": "Bearer root-key"})
            assert ok.status_code == 200 and ok.json()["object"] == "list"


def test_every_api_path_the_console_calls_is_a_route(app_factory):
    called = set()
    for script in SCRIPTS:
        for literal in API_LITERAL.findall(script.read_text()):
            called.add(re.sub(r"\$\{[^}]*\}", "x", literal).split("?")[0])
    # the paths of every page (a broken pattern must not pass by finding nothing)
    assert {"/v1/adapters", "/v1/adapters/x", "/v1/adapters/x/download", "/v1/compositions", "/v1/route",
            "/v1/chat/completions", "/v1/admin/compress", "/health", "/metrics", "/ui/methods.json"} <= called, called
    with app_factory() as client:
        routes = client.app.router.routes
        for path in sorted(called):
            scope = {"type": "http", "path": path, "root_path": "", "method": "GET"}
            assert any(r.matches(scope)[0] in (Match.FULL, Match.PARTIAL) for r in routes) or \
                any(r.matches({**scope, "path": path + "/"})[0] == Match.FULL for r in routes), f"{path}: no such route"
        methods = client.get("/ui/methods.json").json()
        assert [m["name"] for m in methods] == sorted(METHODS) and all("params" in m for m in methods)


def test_every_module_the_console_imports_ships():
    for script in SCRIPTS:
        for target in re.findall(r"""^import .* from "(\.[^"]+)";$""", script.read_text(), flags=re.M):
            assert (script.parent / target).resolve().is_file(), f"{script.name} imports {target}"
    index = (STATIC / "index.html").read_text()
    for asset in re.findall(r'(?:src|href)="/ui/static/([^"]+)"', index):
        assert (STATIC / asset).is_file(), asset
    assert not re.search(r"https?://", "".join(p.read_text() for p in STATIC.rglob("*") if p.is_file())), \
        "the console loads nothing from another site (it must work offline)"


# ---- framing and irreversible actions ---------------------------------------------------------
# every request that changes the library, by method and path expression as the pages write it
MUTATING_CALL = re.compile(r"""call\("(POST|PUT|PATCH|DELETE)", ([^,)]+)""")
# an upload or a composition adds a version (the older ones stay); routing changes nothing
REVERSIBLE = {("POST", "paths.adapters"), ("POST", "paths.compositions"), ("POST", "paths.route")}
CONFIRMED = re.compile(r"if \(!window\.confirm\((?:[^()]|\([^()]*\))*\)\) return")


def test_the_console_refuses_to_run_in_a_frame():
    api, app = (STATIC / "api.js").read_text(), (STATIC / "app.js").read_text()
    assert "export const framed = () => window.top !== window.self;" in api
    for fn in ("call", "download", "streamChat"):  # no request leaves a framed page
        body = re.search(rf"export async function {fn}\([^)]*\) \{{\n(.*?)\n\}}\n", api, flags=re.S)
        assert body and body.group(1).lstrip().startswith("refuseFramed();"), fn
    # the shell starts (listeners, the first page) only outside a frame; inside one it shows a notice
    guarded = r"""\nif \(framed\(\)\) \{\n(?:(?!start\(\)).)*id: "framed"(?:(?!start\(\)).)*\} else \{\n  start\(\);\n\}\n$"""
    assert re.search(guarded, app, flags=re.S), "app.js must check framed() before start()"
    assert app.count("start();") == 1 and app.count("render();") == 2  # render: only from start() and the key bar


def test_every_irreversible_request_asks_the_browser_first():
    sites = []
    for script in SCRIPTS:
        text = script.read_text()
        for m in MUTATING_CALL.finditer(text):
            if (m.group(1), m.group(2).strip()) in REVERSIBLE:
                continue
            sites.append((script.name, m.group(1), m.group(2)))
            before = text[max(0, m.start() - 400):m.start()]
            asks = list(CONFIRMED.finditer(before))
            assert asks, f"{script.name}: {m.group(0)} without window.confirm before it"
            between = before[asks[-1].end():]
            assert "onclick" not in between and "function " not in between, f"{script.name}: {m.group(0)}: the " \
                "confirmation belongs to another handler"
    # deleting a skill or a version, compressing or decompressing the library, cancelling a learn job (a broken
    # pattern finds none)
    assert {(s, m) for s, m, _ in sites} == {("skill.js", "DELETE"), ("ops.js", "POST"), ("learn.js", "DELETE")}, sites
    ops = (STATIC / "pages" / "ops.js").read_text()
    assert ops.count("start({}, COMPRESS_QUESTION)") == 1 and ops.count("start({ off: true }, EXACT_QUESTION)") == 1
    assert "Delete ${label}?" in (STATIC / "pages" / "skill.js").read_text()  # the dialog names what goes


def test_the_console_needs_no_inline_code_under_its_policy():
    """The page's Content-Security-Policy (server/edge/headers.py CONSOLE_CSP) refuses inline scripts, event
    handler attributes and style attributes: the files use none, and h() sets styles through the CSSOM."""
    index = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", index) and "<style" not in index
    assert not re.search(r"""\s(?:on\w+|style)=""", index)
    scripts = "".join(p.read_text() for p in SCRIPTS)
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "new Function", "setTimeout(\"",
                   'setAttribute("style"', "document.write"):
        assert banned not in scripts, banned
    assert 'else if (k === "style") el.style.cssText = v;' in (STATIC / "ui.js").read_text()
