"""Every path that composes has the inference path's compose budget, pool and cancellation (stored
compositions, with or without a quality report, context-aware templates, learned-weight searches), and a
learned-weight search is bounded before it starts (example count, each example's length, the job's total
tokens) and holds one slot per namespace. The engine stays down: none of this needs it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from adapter_store.keys import KeyStore
from composer import CompositionCancelled
from server.api.app import create_app
from server.core import engine as engine_module
from server.core.settings import Settings
from server.jobs import optimize_api
from server.jobs.learned_weights import OptimizeResult, Trial
from tests.helpers import LOCAL, LOCAL_URL, TEST_REDIS_URL, drop_prefix, random_adapter

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def app_factory(monkeypatch, redis_client):
    async def idle(self):  # the engine stays down: nothing here generates
        return None

    monkeypatch.setattr(engine_module.HfEngine, "start", idle)
    prefixes = []

    def make(**kw) -> tuple[TestClient, KeyStore]:
        prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix, **kw)
        return TestClient(create_app(settings), client=LOCAL, base_url=LOCAL_URL), KeyStore(redis_client, prefix)

    yield make
    for p in prefixes:
        drop_prefix(redis_client, p)


def _add(client: TestClient, names: list[str], r: int = 1) -> None:
    service = client.app.state.mosaic
    for i, name in enumerate(names):
        adapter = random_adapter({Q: service.base_spec.shapes[Q]}, r=r, seed=i, base_model=service.base_id)
        service.registry.add(name, adapter, examples=[f"say {name}"])


def _refused(r, setting: str, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and setting in err["message"] and err["param"] == param, err
    return err


def _names(client: TestClient, **kw) -> list[str]:
    return [s["name"] for s in client.get("/v1/adapters", **kw).json()["data"]]


def test_a_stored_composition_over_the_compose_budget_is_refused_before_any_work(app_factory):
    """16 rank-64 skills merged by LEGO with 16 restarts (about 6e13 multiply-adds by the estimate), stored with
    no quality report: the inference path's budget refuses it, nothing is composed or stored."""
    client, _ = app_factory()
    with client:
        skills = [f"s{i}" for i in range(16)]
        _add(client, skills, r=64)
        before = _names(client)
        body = {"name": "huge", "skills": skills, "method": "lego", "params": {"n_init": 16}, "quality_prompts": 0}
        t0 = time.monotonic()
        r = client.post("/v1/compositions", json=body)
        assert time.monotonic() - t0 < 1.0  # refused from the estimate, not after the work
        _refused(r, "MOSAIC_MAX_COMPOSE_WORK", "composition")
        # a context-aware template (stored as the sum of all its inputs) the same
        _refused(client.post("/v1/compositions", json={**body, "weights": "auto"}), "MOSAIC_MAX_COMPOSE_WORK", "composition")
        assert client.get("/v1/adapters/huge").status_code == 404 and _names(client) == before


def test_the_budget_setting_decides_for_stored_compositions(app_factory):
    """The same small composition: stored under the default budget, refused under a lowered one (the
    peak-memory budget too)."""
    body = {"name": "mix", "skills": ["a", "b"], "method": "ties", "quality_prompts": 0}
    for settings, setting in (({"max_compose_work": 1e3}, "MOSAIC_MAX_COMPOSE_WORK"),
                              ({"max_compose_gib": 1e-6}, "MOSAIC_MAX_COMPOSE_GIB")):
        client, _ = app_factory(**settings)
        with client:
            _add(client, ["a", "b"])
            _refused(client.post("/v1/compositions", json=body), setting, "composition")
            assert _names(client) == ["a", "b"]
    client, _ = app_factory()
    with client:
        _add(client, ["a", "b"])
        r = client.post("/v1/compositions", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["composition"]["skills"] == ["a@1", "b@1"] and _names(client) == ["a", "b", "mix"]


def test_a_stored_composition_stops_when_the_client_leaves(app_factory, monkeypatch):
    """The client disconnects while its composition runs on the compose pool: the work is told to stop,
    the pool is free again, and nothing is stored."""
    from server.core import compose_budget

    started, stopped = threading.Event(), threading.Event()
    real_compose = compose_budget.compose

    def slow_compose(adapters, *, stop, **kw):  # a long composition: module after module until told to stop
        started.set()
        while not stop.wait(0.01):
            pass
        stopped.set()
        raise CompositionCancelled("the composition was abandoned")

    client, _ = app_factory()
    with client:
        _add(client, ["a", "b"])
        monkeypatch.setattr(compose_budget, "compose", slow_compose)
        body = json.dumps({"name": "left", "skills": ["a", "b"], "quality_prompts": 0}).encode()
        sent = []

        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.to_thread(started.wait, 10)  # the client leaves once the work has begun
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/compositions", "raw_path": b"/v1/compositions", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": LOCAL, "server": ("127.0.0.1", 80), "state": {}}
        client.portal.call(client.app, scope, receive, send)
        assert stopped.wait(5), "the composition was not stopped"
        assert [m["status"] for m in sent[1:] if m["type"] == "http.response.start"] == [499]
        assert client.get("/v1/adapters/left").status_code == 404
        # the compose pool (one thread) is free for the next composition
        monkeypatch.setattr(compose_budget, "compose", real_compose)
        r = client.post("/v1/compositions", json={"name": "next", "skills": ["a", "b"], "quality_prompts": 0})
        assert r.status_code == 201, r.text


def _optimize(examples, **options) -> dict:
    return {"examples": examples, "budget": 2, **options}


def test_a_learned_weight_search_with_a_huge_example_is_refused_before_it_starts(app_factory):
    """The exact request: a 2,000,000-character example (400,033 tokens for the loss model); then each
    other bound of a search, each named with its setting; no job is queued by any of them."""
    client, _ = app_factory()
    base = {"name": "learned", "skills": ["a", "b"], "quality_prompts": 0}
    with client:
        _add(client, ["a", "b"])

        def post(optimize):
            return client.post("/v1/compositions", json={**base, "optimize": optimize})

        huge = [{"prompt": "x" * 2_000_000, "answer": "y"}]
        _refused(post(_optimize(huge)), "MOSAIC_MAX_PROMPT_CHARS", "optimize.examples[0]")
        words = [{"prompt": "ok", "answer": "y"}, {"prompt": "word " * 5_000, "answer": "y"}]  # 25,000 chars, ~5,000 tokens
        _refused(post(_optimize(words)), "MOSAIC_MAX_PROMPT_TOKENS", "optimize.examples[1]")
        _refused(post(_optimize(["p"] * 257)), "MOSAIC_MAX_EXAMPLES", "optimize.examples")
        _refused(post(_optimize(["a short prompt"] * 200, budget=2000)), "MOSAIC_MAX_JOB_TOKENS", "optimize.budget")
        assert client.get("/v1/compositions/jobs").json() == []
        assert _names(client) == ["a", "b"]
    # each evaluation composes: the compose budget (lowered here) applies before the search starts
    client, _ = app_factory(max_compose_work=1e3)
    with client:
        _add(client, ["a", "b"])
        r = client.post("/v1/compositions", json={**base, "optimize": _optimize(["p"])})
        _refused(r, "MOSAIC_MAX_COMPOSE_WORK", "composition")
        assert client.get("/v1/compositions/jobs").json() == []


def test_registered_examples_are_bounded_too(app_factory):
    """No examples sent: each skill's registered example prompts are scored, and counted against the limits."""
    client, _ = app_factory(max_examples=3)
    with client:
        _add(client, ["a", "b"])
        client.app.state.mosaic.registry.add("c", client.app.state.mosaic.registry.load("a")[1],
                                             examples=["one", "two", "three"])
        r = client.post("/v1/compositions", json={"name": "learned", "skills": ["a", "c"], "quality_prompts": 0,
                                                  "optimize": {"budget": 2}})
        _refused(r, "MOSAIC_MAX_EXAMPLES", "optimize.examples_per_skill")
        assert client.get("/v1/compositions/jobs").json() == []


def test_one_search_at_a_time_per_namespace(app_factory, monkeypatch):
    """A search of namespace a does not keep b's (or a key without a namespace) waiting; a second one of the
    same namespace is a 409 naming it."""
    release = threading.Event()

    def held_search(registry, comp, options, model, pick_for, *, stop, **kw):  # a search that runs until released
        while not (release.wait(0.01) or stop.is_set()):
            pass
        trial = Trial(weights=[1.0, 1.0], loss=1.0, objective=1.0)
        return comp, OptimizeResult(weights=[1.0, 1.0], initial=trial, best=trial, trace=[trial], examples=1,
                                    targets="given", seconds=0.0, cancelled=True)

    monkeypatch.setattr(optimize_api, "optimize_composition", held_search)
    client, keys = app_factory(max_searches=3)
    with client:
        client.app.state.mosaic.reference = object()  # the search above needs no model: none is loaded
        _add(client, ["a/one", "a/two", "b/one", "b/two", "c/one", "c/two"])
        team_a, _ = keys.create("team-a", ["admin"], namespace="a")
        team_b, _ = keys.create("team-b", ["admin"], namespace="b")
        team_c, _ = keys.create("team-c", ["admin"], namespace="c")
        root, _ = keys.create("ops", ["admin"])

        def search(key, ns, name):
            body = {"name": f"{ns}/{name}" if ns else name, "skills": [f"{ns or 'a'}/one", f"{ns or 'a'}/two"],
                    "quality_prompts": 0, "optimize": _optimize([{"prompt": "p", "answer": "y"}])}
            return client.post("/v1/compositions", json=body, headers={"Authorization": f"Bearer {key}"})

        try:
            first = search(team_a, "a", "first")
            assert first.status_code == 202, first.text
            clash = search(team_a, "a", "second")
            assert clash.status_code == 409 and "namespace 'a'" in clash.json()["error"]["message"], clash.text
            assert search(team_b, "b", "first").status_code == 202
            assert search(root, None, "first").status_code == 202  # the root key: its own slot
            clash = search(root, None, "second")
            assert clash.status_code == 409 and "without a namespace" in clash.json()["error"]["message"], clash.text
            full = search(team_c, "c", "first")  # three running: the server's own cap, whatever the namespace
            assert full.status_code == 409 and "MOSAIC_MAX_SEARCHES" in full.json()["error"]["message"], full.text
            jobs = client.get("/v1/compositions/jobs", headers={"Authorization": f"Bearer {team_b}"}).json()
            assert [j["name"] for j in jobs] == ["b/first"] and "namespace" not in jobs[0]
            # cancelled, a's slot is free again
            assert client.delete(f"/v1/compositions/jobs/{first.json()['id']}",
                                 headers={"Authorization": f"Bearer {team_a}"}).status_code == 200
            deadline = time.monotonic() + 10
            while client.get(f"/v1/compositions/jobs/{first.json()['id']}",
                             headers={"Authorization": f"Bearer {root}"}).json()["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert search(team_a, "a", "third").status_code == 202
        finally:
            release.set()


def test_a_search_within_its_bounds_runs_on_the_compose_pool_and_is_stored(app_factory, monkeypatch):
    """The real search (the reference model's loss, two evaluations): each candidate composed by the server's
    composer, the result stored with its trace."""
    client, _ = app_factory()
    with client:
        _add(client, ["a", "b"])
        composer = client.app.state.mosaic.cache.composer
        composed = []
        real = composer.compose_blocking
        monkeypatch.setattr(composer, "compose_blocking", lambda *a, **kw: composed.append(a[0]) or real(*a, **kw))
        body = {"name": "learned", "skills": ["a", "b"], "weights": [1.0, 0.5], "quality_prompts": 0,
                "optimize": _optimize([{"prompt": "Say hi.", "answer": "hi"}])}
        r = client.post("/v1/compositions", json=body)
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 300
        while (job := client.get(f"/v1/compositions/jobs/{r.json()['id']}").json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert job["state"] == "done", job
        stored = client.get("/v1/adapters/learned").json()["composition"]
        assert len(stored["optimize"]["trace"]) == 2 and stored["optimize"]["initial"]["weights"] == [1.0, 0.5]
        assert len(composed) == 2 and all(c.skills == ("a@1", "b@1") for c in composed)  # one per evaluation
