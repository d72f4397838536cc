"""API keys: hashed in Redis, scoped; 401 without a key, 403 with one lacking the scope; without keys the
library is open to loopback clients only."""

import asyncio
import json
import uuid

import pytest
from fastapi.testclient import TestClient

from adapter_store.keys import KeyStore
from lora.errors import ConflictError
from server.api.app import create_app
from server.cli.launch import mosaic_cli
from server.core import engine as engine_module
from server.core.settings import Settings
from tests.helpers import LOCAL, LOCAL_URL, TEST_REDIS_URL, drop_prefix
from tests.server.test_serving_layer import engine, served  # noqa: F401 - the app over a mocked vLLM engine

REMOTE = ("203.0.113.7", 50000)  # a client that is not on this machine


@pytest.fixture
def app_factory(monkeypatch, redis_client, tmp_path, base_model_dir, base_spec):
    async def idle(self):  # the library API is what is tested here; the engine stays down
        return None

    monkeypatch.setattr(engine_module.HfEngine, "start", idle)
    prefixes = []

    def make(client=LOCAL, **kw):
        prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        # a data dir of its own (it remembers the registry: adapter_store/high_water.py)
        settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix, data_dir=tmp_path / prefix,
                            base_model=str(base_model_dir), base_model_id=base_spec.model_id, **kw)
        return TestClient(create_app(settings), client=client, base_url=LOCAL_URL), KeyStore(redis_client, prefix)

    yield make
    for p in prefixes:
        drop_prefix(redis_client, p)


def _delete(client, key=None):
    return client.delete("/v1/adapters/ghost", headers=_bearer(key))


def _bearer(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_without_keys_admin_and_read_are_open_on_loopback_only(app_factory):
    local, _ = app_factory()
    remote, _ = app_factory(client=REMOTE)
    chosen, _ = app_factory(client=REMOTE, open_admin=True)
    with local, remote, chosen:
        assert _delete(local).status_code == 404 and local.get("/v1/adapters").status_code == 200
        for r in (_delete(remote), remote.get("/v1/adapters"), remote.get("/v1/adapters/ghost/download"), remote.get("/metrics")):
            assert r.status_code == 401 and "MOSAIC_OPEN_ADMIN" in r.json()["error"]["message"], r.text
        assert _delete(chosen).status_code == 404 and chosen.get("/v1/adapters").status_code == 200
        assert remote.get("/health").status_code in (200, 503)  # health is never behind a key


def test_without_keys_a_web_page_cannot_act_for_the_local_user(app_factory):
    client, _ = app_factory()
    with client:
        assert client.get("/v1/adapters").status_code == 200
        # a cross-site form post from a page the local user has open, and a DNS-rebinding page
        assert _delete(client).status_code == 404
        for headers in ({"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}, {"host": "evil.example:8000"}):
            r = client.delete("/v1/adapters/ghost", headers=headers)
            assert r.status_code == 401, (headers, r.text)
        assert client.get("/v1/adapters", headers={"origin": "http://127.0.0.1:8000"}).status_code == 200


def test_model_cards_list_skills_only_to_readers(app_factory, redis_client):
    client, keys = app_factory()
    with client:
        from tests.helpers import random_adapter

        service = client.app.state.mosaic
        q = "model.layers.0.self_attn.q_proj"
        service.registry.add("tiny", random_adapter({q: service.base_spec.shapes[q]}, r=1), description="secret sauce")
        card = next(c for c in client.get("/v1/models").json()["data"] if c["id"] == "tiny")
        assert card["mosaic"]["description"] == "secret sauce"  # on this machine, without keys: readable
        keys.create("ops", ["admin"])
        user_key, _ = keys.create("app", ["inference"])
        reader_key, _ = keys.create("viewer", ["read"])
        ids = [c["id"] for c in client.get("/v1/models", headers=_bearer(user_key)).json()["data"]]
        assert ids == [service.base_id, "auto"]  # inference without 'read': the base model and the router
        cards = client.get("/v1/models", headers=_bearer(reader_key)).json()["data"]
        card = next(c for c in cards if c["id"] == "tiny")
        assert card["parent"] == service.base_id and card["mosaic"]["description"] == "secret sauce"


def test_keys_lock_the_library_for_good_and_scopes_are_checked(app_factory, redis_client):
    client, keys = app_factory()
    with client:
        admin_key, _ = keys.create("ops", ["admin"])
        user_key, _ = keys.create("app", ["inference"])
        reader_key, _ = keys.create("viewer", ["read"])
        r = _delete(client)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert _delete(client, "mk-wrong").status_code == 401
        r = _delete(client, user_key)
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        assert _delete(client, reader_key).status_code == 403
        assert _delete(client, admin_key).status_code == 404
        for path in ("/v1/adapters", "/metrics"):  # reading the library needs 'read' (admin implies it)
            assert client.get(path).status_code == 401
            assert client.get(path, headers=_bearer(user_key)).status_code == 403
            assert client.get(path, headers=_bearer(reader_key)).status_code == 200
            assert client.get(path, headers=_bearer(admin_key)).status_code == 200
        assert client.get("/v1/adapters/ghost/download", headers=_bearer(reader_key)).status_code == 404
        for name in ("ops", "app", "viewer"):
            keys.revoke(name)
        # revoking every key does not reopen the library, not even on loopback
        assert _delete(client).status_code == 401 and client.get("/v1/adapters").status_code == 401
        assert _delete(client, admin_key).status_code == 401
    # only hashes are stored
    dump = b"".join(v for k in redis_client.scan_iter(match=f"{keys.k_info.split(':')[0]}:keys:*")
                    if redis_client.type(k) == b"hash" for v in redis_client.hgetall(k).values())
    assert user_key.encode() not in dump and admin_key.encode() not in dump


def test_root_key_and_inference_keys(app_factory):
    client, keys = app_factory(api_key="root-secret", require_inference_key=True)
    with client:
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        assert _delete(client, "root-secret").status_code == 404
        user_key, _ = keys.create("app", ["inference"])
        r = client.post("/v1/chat/completions", json=body, headers=_bearer(user_key))
        assert r.status_code == 503  # past auth; the engine is down in this test
        assert _delete(client, user_key).status_code == 403


def test_requiring_inference_keys_locks_admin_too(app_factory):
    client, _ = app_factory(require_inference_key=True)
    with client:
        assert _delete(client).status_code == 401 and client.get("/v1/adapters").status_code == 401


def test_the_key_is_checked_before_the_body_is_read(app_factory):
    client, keys = app_factory()
    keys.create("ops", ["admin"])
    with client:
        reads = 0

        async def receive():
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 2**20, "more_body": True}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/adapters", "raw_path": b"/v1/adapters",
                 "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000), "client": LOCAL,
                 "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"104857600")]}
        asyncio.run(client.app(scope, receive, send))
        assert sent[0]["status"] == 401 and reads == 0


def test_serve_refuses_a_public_bind_without_a_key(server_env):
    env = {k: v for k, v in server_env.items() if k not in ("MOSAIC_API_KEY", "MOSAIC_OPEN_ADMIN")}
    env["MOSAIC_REDIS_PREFIX"] = f"mosaic-test-{uuid.uuid4().hex[:10]}"
    done = mosaic_cli(env, "serve", "--host", "0.0.0.0", "--port", "1")
    assert done.returncode == 2 and "MOSAIC_API_KEY" in done.stderr and "MOSAIC_OPEN_ADMIN" in done.stderr, done.stderr


def test_key_names_and_scopes_are_checked(redis_client):
    keys = KeyStore(redis_client, f"mosaic-test-{uuid.uuid4().hex[:10]}")
    with pytest.raises(ValueError, match="scopes"):
        keys.create("a", ["root"])
    with pytest.raises(ValueError, match="not allowed"):
        keys.create("bad name", ["admin"])
    for namespace in ("a/b", "", "a b", "x" * 65):
        with pytest.raises(ValueError, match="namespace"):
            keys.create("n", ["admin"], namespace=namespace)
    keys.create("a", ["admin"])
    with pytest.raises(ConflictError, match="exists"):
        keys.create("a", ["admin"])
    keys.revoke("a")


def test_a_key_limited_to_a_namespace_reaches_only_its_skills(app_factory, tmp_path):
    from tests.helpers import random_adapter

    client, keys = app_factory(require_inference_key=True)
    with client:
        service = client.app.state.mosaic
        q = "model.layers.0.self_attn.q_proj"
        folder = random_adapter({q: service.base_spec.shapes[q]}, r=1).save_dir(tmp_path / "skill")
        files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir())]
        admin, _ = keys.create("ops", ["admin"])
        team_a, _ = keys.create("team-a", ["admin"], namespace="a")
        app_b, _ = keys.create("app-b", ["read", "inference"], namespace="b")

        def upload(name, key):
            return client.post("/v1/adapters", data={"name": name}, files=files, headers=_bearer(key))

        def names(key):
            return [s["name"] for s in client.get("/v1/adapters", headers=_bearer(key)).json()["data"]]

        assert upload("a/one", team_a).status_code == 201
        for name in ("b/two", "plain"):
            r = upload(name, team_a)
            assert r.status_code == 403 and "'a/…'" in r.json()["error"]["message"], r.text
        assert upload("b/two", admin).status_code == 201 and upload("plain", admin).status_code == 201
        assert upload("a/download", admin).status_code == 400  # would read as a's download
        assert upload("a/b/c", admin).status_code == 400  # one namespace level
        assert names(team_a) == ["a/one"] and names(app_b) == ["b/two"]
        assert names(admin) == ["a/one", "b/two", "plain"]

        # details, downloads and deletes: own namespace only; the library is unchanged by a refusal
        assert client.get("/v1/adapters/a/one", headers=_bearer(team_a)).json()["name"] == "a/one"
        r = client.get("/v1/adapters/a/one/download", headers=_bearer(team_a))
        assert r.status_code == 200 and 'filename="a_one-v1.tar.gz"' in r.headers["content-disposition"]
        for r in (client.get("/v1/adapters/b/two", headers=_bearer(team_a)),
                  client.get("/v1/adapters/b/two/download", headers=_bearer(team_a)),
                  client.delete("/v1/adapters/b/two", headers=_bearer(team_a)),
                  client.delete("/v1/adapters/plain", headers=_bearer(team_a))):
            assert r.status_code == 403, r.text
        assert names(admin) == ["a/one", "b/two", "plain"]

        # a composition's name and every input must be in the namespace
        body = {"name": "a/mix", "skills": ["a/one", "b/two"], "quality_prompts": 0}
        r = client.post("/v1/compositions", json=body, headers=_bearer(team_a))
        assert r.status_code == 403 and "b/two" in r.json()["error"]["message"]
        # what spans the whole library is refused
        assert client.get("/metrics", headers=_bearer(app_b)).status_code == 403
        assert client.post("/v1/admin/compress", json={}, headers=_bearer(team_a)).status_code == 403
        assert client.get("/v1/admin/compress", headers=_bearer(team_a)).status_code == 403

        # inference: the namespace's skills, the base model, compositions of its own skills; not 'auto'
        def route(key, **body):
            return client.post("/v1/route", json={"prompt": "hello", **body}, headers=_bearer(key))

        assert route(app_b, model="b/two").json()["skill"] == "b/two"
        assert route(app_b, model=service.base_id).json()["kind"] == "base"
        for r in (route(app_b, model="a/one"), route(app_b, model="plain"), route(app_b),
                  route(app_b, model="auto"), route(app_b, composition={"skills": ["b/two", "a/one"], "weights": "auto"})):
            assert r.status_code == 403, r.text
        # a stored context-aware composition in b's namespace over a skill outside it: not reachable either
        ctx = {"name": "b/ctx", "skills": ["b/two", "plain"], "weights": "auto", "quality_prompts": 0}
        assert client.post("/v1/compositions", json=ctx, headers=_bearer(admin)).status_code == 201
        r = route(app_b, model="b/ctx")
        assert r.status_code == 403 and "plain" not in r.text, r.text
        assert upload(service.base_id, admin).status_code == 400  # the base model's id is not a skill name
        models = {c["id"] for c in client.get("/v1/models", headers=_bearer(app_b)).json()["data"]}
        assert models == {service.base_id, "b/two", "b/ctx"}
        assert client.delete("/v1/adapters/a/one", headers=_bearer(team_a)).status_code == 200
        assert names(admin) == ["b/ctx", "b/two", "plain"]


def _library_of_two(service) -> None:
    from tests.helpers import random_adapter

    q = "model.layers.0.self_attn.q_proj"
    for name, about in (("reviews", "classify the sentiment of a product review"),
                        ("hidden", "summarise the quarterly merger plans of the board")):
        service.registry.add(name, random_adapter({q: service.base_spec.shapes[q]}, r=1), description=about,
                             examples=[about])


def test_what_inference_shows_of_the_library_to_callers_who_may_not_read_it(app_factory):
    """/v1/models lists no skill, and /v1/route gives no per-skill scores, to a caller without 'read': a client
    from another machine on a keyless server, an anonymous one on a locked server; loopback on a keyless
    server and a read key see everything."""
    local, keys = app_factory(router="lexical")
    with local:
        service = local.app.state.mosaic
        _library_of_two(service)
        remote = TestClient(local.app, client=REMOTE, base_url=LOCAL_URL)  # the same server, from elsewhere
        prompt = {"prompt": "classify the sentiment of this product review"}

        def models(client, key=None):
            return [c["id"] for c in client.get("/v1/models", headers=_bearer(key)).json()["data"]]

        def route(client, key=None):
            r = client.post("/v1/route", json=prompt, headers=_bearer(key))
            assert r.status_code == 200, r.text
            return r.json()

        assert models(local) == [service.base_id, "hidden", "reviews", "auto"]
        assert set(route(local)["scores"]) == {"hidden", "reviews"}
        # the exact requests: an anonymous client lists the library and reads the router's scores
        for anonymous in (remote, local):
            if anonymous is local:  # locked from here on: loopback no longer reads without a key
                keys.create("ops", ["admin"])
            assert models(anonymous) == [service.base_id, "auto"]
            assert models(anonymous, "test") == [service.base_id, "auto"]  # an OpenAI client's placeholder key
            plan = route(anonymous)
            assert plan["kind"] == "skill" and plan["skill"] == "reviews"  # what serves the prompt, still
            assert plan["scores"] == {} and plan["similarity"] == {} and "hidden" not in json.dumps(plan)
            assert models(anonymous, "mk-unknown") == [service.base_id, "auto"]
        reader, _ = keys.create("viewer", ["read"])
        assert models(remote, reader) == [service.base_id, "hidden", "reviews", "auto"]
        assert set(route(remote, reader)["scores"]) == {"hidden", "reviews"}


def test_a_key_sent_to_open_inference_limits_it_to_its_namespace(app_factory):
    """Inference is open (no MOSAIC_REQUIRE_INFERENCE_KEY), yet a namespaced key that is sent is applied."""
    local, keys = app_factory(router="lexical")
    with local:
        service = local.app.state.mosaic
        _library_of_two(service)
        from tests.helpers import random_adapter

        q = "model.layers.0.self_attn.q_proj"
        service.registry.add("a/one", random_adapter({q: service.base_spec.shapes[q]}, r=1), description="team a's")
        team_a, _ = keys.create("team-a", ["read", "inference"], namespace="a")
        remote = TestClient(local.app, client=REMOTE, base_url=LOCAL_URL)
        ids = [c["id"] for c in remote.get("/v1/models", headers=_bearer(team_a)).json()["data"]]
        assert ids == [service.base_id, "a/one"]
        for body in ({"prompt": "hi", "model": "reviews"}, {"prompt": "hi"}, {"prompt": "hi", "model": "auto"}):
            r = remote.post("/v1/route", json=body, headers=_bearer(team_a))
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
        r = remote.post("/v1/route", json={"prompt": "hi", "model": "a/one"}, headers=_bearer(team_a))
        assert r.status_code == 200 and r.json()["skill"] == "a/one"
        body = {"model": "reviews", "messages": [{"role": "user", "content": "hi"}]}
        service.engine.ready = lambda: True  # past the engine check: the plan refuses before any generation
        r = remote.post("/v1/chat/completions", json=body, headers=_bearer(team_a))
        assert r.status_code == 403 and "reviews" in r.json()["error"]["message"], r.text


def test_an_answer_shows_the_routers_scores_only_to_readers(served, engine):  # noqa: F811
    """``model: "auto"``: the answer's ``mosaic`` field and ``x-mosaic-plan`` header name the skill that
    served, and the router's per-skill scores only to a caller who may read the library."""
    client, _ = served
    remote = TestClient(client.app, client=REMOTE, base_url=LOCAL_URL)  # keyless server, another machine
    body = {"model": "auto", "max_tokens": 4, "messages": [
        {"role": "user", "content": "Is this review positive or negative? I found the pizza delightful."}]}
    scores = client.post("/v1/chat/completions", json=body).json()["mosaic"]["scores"]  # this machine, keyless
    assert {"sentiment", "json_extract"} <= set(scores)
    r = remote.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for shown in (r.json()["mosaic"], json.loads(r.headers["x-mosaic-plan"])):
        assert shown["skills"] == ["sentiment@1"] and "scores" not in shown and "json_extract" not in json.dumps(shown)


def test_a_key_sent_to_open_inference_while_redis_is_away_does_not_stop_inference():
    """Open inference serves what it can while Redis is away; a Mosaic key it cannot look up limits nothing."""
    from types import SimpleNamespace

    import redis as redis_module

    from server.edge.auth import _offered_namespace

    def away(token):
        raise redis_module.ConnectionError("Connection refused")

    service = SimpleNamespace(keys=SimpleNamespace(lookup=away))
    assert _offered_namespace(service, {"authorization": "Bearer mk-abc"}) is None
