"""No answer of the server may be framed by another site's page (a framed console clicks through the
keyless admin API of this machine: "Compress the library" in one click, a delete in two), and the API
docs load nothing from another site: Swagger UI and ReDoc come from the pinned fastapi-offline package,
served here without a key, under a Content-Security-Policy with no inline script but the page's own."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.core import engine as engine_module
from server.core.settings import Settings
from server.edge.api_docs import ASSETS, ASSETS_DIR
from server.edge.headers import CONSOLE_CSP, DEFAULT_CSP
from tests.helpers import LOCAL, LOCAL_URL, TEST_REDIS_URL, drop_prefix

REMOTE = ("203.0.113.7", 50000)  # a client that is not on this machine
# what a browser sends for http://127.0.0.1:8000/ui#/ops framed by a page of another site
FRAMED_BY_ANOTHER_SITE = {"sec-fetch-dest": "iframe", "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate",
                          "referer": "https://attacker.example/clickjack.html"}


@pytest.fixture
def app_factory(monkeypatch, redis_client):
    async def idle(self):  # headers and files are what is tested; the engine stays down
        return None

    monkeypatch.setattr(engine_module.HfEngine, "start", idle)
    prefixes = []

    def make(client=LOCAL, **kw):
        prefixes.append(f"mosaic-test-{uuid.uuid4().hex[:10]}")
        settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefixes[-1], **kw)
        return TestClient(create_app(settings), client=client, base_url=LOCAL_URL, raise_server_exceptions=False)

    yield make
    for p in prefixes:
        drop_prefix(redis_client, p)


def _csp(r) -> dict[str, str]:
    """The response's policy as {directive: sources}."""
    policy = r.headers.get("content-security-policy", "")
    return {d.split()[0]: " ".join(d.split()[1:]) for d in (x.strip() for x in policy.split(";")) if d}


def _assert_unframeable(r) -> None:
    assert r.headers.get("x-frame-options") == "DENY", (r.request.url, r.status_code, dict(r.headers))
    assert r.headers.get_list("x-frame-options") == ["DENY"]
    assert len(r.headers.get_list("content-security-policy")) == 1
    assert _csp(r).get("frame-ancestors") == "'none'", (r.request.url, r.status_code,
                                                        r.headers.get("content-security-policy"))


def test_the_console_framed_by_another_site_is_refused_by_the_browser(app_factory):
    with app_factory() as client:
        r = client.get("/ui", headers=FRAMED_BY_ANOTHER_SITE)
        assert r.status_code == 200
        _assert_unframeable(r)
        assert r.headers["content-security-policy"] == CONSOLE_CSP
        policy = _csp(r)
        assert policy["default-src"] == "'self'" and "script-src" not in policy  # scripts: this origin only
        assert "unsafe-inline" not in r.headers["content-security-policy"]
        assert "unsafe-eval" not in r.headers["content-security-policy"]


@pytest.mark.parametrize("locked", [False, True], ids=["no keys", "MOSAIC_API_KEY set"])
def test_every_kind_of_answer_forbids_framing(app_factory, locked):
    keys = {"api_key": "root-key"} if locked else {}
    with app_factory(max_request_mb=1, **keys) as local, app_factory(client=REMOTE, **keys) as remote:
        answers = {
            "console": local.get("/ui"),
            "console redirect": local.get("/ui/", follow_redirects=False),
            "console file": local.get("/ui/static/app.js"),
            "console methods": local.get("/ui/methods.json"),
            "swagger ui": local.get("/docs"),
            "redoc": local.get("/redoc"),
            "docs asset": local.get("/docs/assets/swagger-ui.css"),
            "openapi": local.get("/openapi.json"),
            "health": local.get("/health"),  # 503: the engine is down here
            "api json": local.get("/v1/models"),
            "metrics mount": local.get("/metrics/", headers={"authorization": "Bearer root-key"} if locked else {}),
            "401": remote.get("/v1/adapters"),
            "404": local.get("/no/such/page"),
            "404 in a mount": local.get("/ui/static/no-such.js"),
            "400": local.post("/v1/completions", json={"model": 7}),
            "413": local.post("/v1/completions", content=b"x" * (2 * 1024 * 1024),
                              headers={"content-type": "application/json"}),
        }
        expected = {"console": 200, "console redirect": 307, "swagger ui": 200, "redoc": 200, "docs asset": 200,
                    "openapi": 200, "api json": 200, "metrics mount": 200, "401": 401, "404": 404,
                    "404 in a mount": 404, "413": 413}
        for what, r in answers.items():
            assert r.status_code == expected.get(what, r.status_code), (what, r.status_code, r.text[:300])
            _assert_unframeable(r)
        assert answers["api json"].headers["content-security-policy"] == DEFAULT_CSP
        assert answers["413"].json()["error"]["code"] == "413"


def test_an_unexpected_error_forbids_framing_too(app_factory):
    client = app_factory()

    @client.app.get("/boom")
    async def boom():
        raise RuntimeError("not handled anywhere")

    with client:
        r = client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    _assert_unframeable(r)


def test_a_route_with_its_own_policy_still_forbids_framing(app_factory):
    from fastapi.responses import PlainTextResponse

    client = app_factory()

    @client.app.get("/own-policy")
    async def own_policy():
        return PlainTextResponse("x", headers={"content-security-policy": "default-src 'self';",
                                               "x-frame-options": "SAMEORIGIN"})

    with client:
        r = client.get("/own-policy")
    _assert_unframeable(r)
    assert r.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"


def _asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_nothing_from_another_site(app_factory, page):
    with app_factory(api_key="root-key") as local, app_factory(client=REMOTE, api_key="root-key") as remote:
        r = remote.get(page)  # no key, not on this machine: the page and its files hold no data
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://", r.text), re.findall(r"https?://\S+", r.text)
        urls = _asset_urls(r.text)
        assert any(u.endswith(".js") for u in urls), urls
        for url in urls:
            assert url.startswith("/docs/assets/"), url
            asset = remote.get(url)
            assert asset.status_code == 200, (url, asset.text[:200])
            assert asset.content == (ASSETS_DIR / url.rsplit("/", 1)[1]).read_bytes()
            _assert_unframeable(asset)
        spec = re.search(r"""(?:url: ?'|spec-url=")([^'"]+)""", r.text).group(1)
        assert spec == "/openapi.json" and remote.get(spec).status_code == 200
        # the docs' own calls keep the API's rules
        assert remote.get("/v1/adapters").status_code == 401
        assert local.get("/v1/adapters").status_code == 401
        assert local.get("/v1/adapters", headers={"authorization": "Bearer root-key"}).status_code == 200


def test_the_swagger_page_allows_only_its_own_inline_script(app_factory):
    with app_factory() as client:
        r = client.get("/docs")
    policy = _csp(r)
    inline = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    assert len(inline) == 1 and "SwaggerUIBundle(" in inline[0]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert policy["script-src"].split() == ["'self'", f"'sha256-{digest}'"]
    assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
    assert "unsafe-" not in r.headers["content-security-policy"]  # Swagger UI runs with no inline style either
    assert '"validatorUrl": null' in inline[0]  # Swagger UI would otherwise send the spec to an outside validator
    assert "/docs/assets/swagger-ui-bundle.js" in r.text and "/docs/assets/swagger-ui.css" in r.text


def test_only_the_named_docs_assets_are_served(app_factory):
    assert all((ASSETS_DIR / name).is_file() for name in ASSETS)
    with app_factory(client=REMOTE, api_key="root-key") as remote:
        js = remote.get("/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        for path in ("/docs/assets/core.py", "/docs/assets/..%2F__init__.py", "/docs/assets/../api_docs.py",
                     "/docs/assets/"):
            r = remote.get(path)
            assert r.status_code == 404, (path, r.status_code)
            _assert_unframeable(r)


def test_redoc_gets_inline_styles_and_its_search_worker_but_no_inline_script(app_factory):
    with app_factory() as client:
        r = client.get("/redoc")
    policy = _csp(r)
    assert "<script>" not in r.text and policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self' 'unsafe-inline'"  # ReDoc writes its styles at run time
    assert policy["worker-src"] == "'self' blob:"  # its search index runs in a worker made from a blob
    assert "fonts.googleapis" not in r.text and '<redoc spec-url="/openapi.json">' in r.text


def test_answers_made_outside_the_app_get_the_framing_rules_too():
    """The Ray ingress answers some requests itself (401, 413, a replica's failure as a 503)."""
    from starlette.responses import JSONResponse, StreamingResponse

    from server.edge.headers import forbid_framing

    for response in (JSONResponse({"error": {}}, status_code=413),
                     StreamingResponse(iter([b"x"]), headers={"x-frame-options": "SAMEORIGIN",
                                                             "content-security-policy": "default-src 'self'"})):
        headers = forbid_framing(response).headers
        assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert len(headers.getlist("x-frame-options")) == 1
