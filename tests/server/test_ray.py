"""Mosaic on Ray Serve (server/ray/app.py).

Fast: the ingress's choice of multiplexed model id (base, skill, pinned version, composition, context-aware
composition, auto, refused requests) on the real registry and router, without Ray actors.
Slow: `mosaic serve --ray --replicas 2` (a local Ray cluster, two replicas, each with the real vLLM engine, about 3 GB each; both
engines start in 1-3 minutes on 2 cores, so the module runs in the slow tier): requests for a skill after
the first land on the replica that loaded it; an upload through the ingress is served on the next request;
killing a replica's process answers its requests with a 503 (never a hang), the other replica keeps
serving, Ray replaces the dead one, and the library in Redis is whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import httpx
import pytest

from composer.spec import Composition
from lora.adapter import LoraAdapter
from tests.helpers import BASE, DEMO, JSON_PROMPT, TEST_REDIS_URL, drop_prefix, mosaic_env, new_prefix

SKILLS = ["sentiment", "json_extract", "uppercase"]


def _add_demo(registry, names=SKILLS) -> None:
    for name in names:
        meta = json.loads((DEMO / name / "mosaic.json").read_text())
        registry.add(name, LoraAdapter.from_dir(DEMO / name), description=meta["description"], examples=meta["examples"])


@pytest.fixture
def planner(redis_client, base_model_dir, tmp_path, monkeypatch):
    """The ingress's planning service on the real registry (the lexical router: no training needed)."""
    from server.core.settings import Settings
    from server.core.state import build

    prefix = new_prefix()
    for k, v in mosaic_env(base_model_dir, BASE, tmp_path, prefix, router="lexical").items():
        if k.startswith("MOSAIC_"):
            monkeypatch.setenv(k, v)
    service = build(Settings())
    _add_demo(service.registry)
    yield service
    drop_prefix(redis_client, prefix)


def _key(service, path: str, body) -> str:
    from server.ray.routing import adapter_key

    return asyncio.run(adapter_key(service, path, json.dumps(body).encode() if not isinstance(body, bytes) else body))


def test_adapter_key_names_what_serves_the_request(planner):
    reg = planner.registry
    chat = "/v1/chat/completions"
    msg = [{"role": "user", "content": JSON_PROMPT}]
    sentiment = reg.info("sentiment").content_id
    # base model, anything that does not generate, bodies a replica will refuse: no id (any replica)
    assert _key(planner, chat, {"model": BASE, "messages": msg}) == ""
    assert _key(planner, "/v1/adapters", {"model": "sentiment"}) == ""
    assert _key(planner, chat, {"model": "no-such-skill", "messages": msg}) == ""
    assert _key(planner, chat, b"{not json") == ""
    # vLLM's own checks (VLLMValidationError is not a ValueError): the replica answers the 400
    assert _key(planner, chat, {"model": "sentiment", "messages": msg, "stream_options": {"include_usage": True}}) == ""
    assert _key(planner, chat, {"model": "sentiment", "messages": msg, "top_logprobs": 2}) == ""
    # a skill: its content id, by name, pinned version, on every OpenAI endpoint
    assert _key(planner, chat, {"model": "sentiment", "messages": msg}) == sentiment
    assert _key(planner, chat, {"model": "sentiment@1", "messages": msg}) == sentiment
    assert _key(planner, "/v1/completions", {"model": "sentiment", "prompt": "hi"}) == sentiment
    assert _key(planner, "/v1/responses", {"model": "sentiment", "input": "hi"}) == sentiment
    # a composition: its content key (the adapter folder's name on every replica)
    comp = {"skills": ["sentiment", "json_extract"], "weights": [1.0, 0.5]}
    want = Composition.model_validate(comp).content_key(
        [sentiment, reg.info("json_extract").content_id], planner.settings.max_lora_rank)
    assert _key(planner, chat, {"model": BASE, "messages": msg, "composition": comp}) == want
    assert want not in ("", sentiment)
    # auto: the router decides before dispatch; a JSON prompt goes to json_extract's replica
    assert _key(planner, chat, {"model": "auto", "messages": msg}) == reg.info("json_extract").content_id
    # a new version is new content: a new id, so no replica serves the old folder for it
    reg.add("sentiment", LoraAdapter.from_dir(DEMO / "uppercase"), description="now shouting")
    assert _key(planner, chat, {"model": "sentiment", "messages": msg}) not in ("", sentiment)
    assert _key(planner, chat, {"model": "sentiment@1", "messages": msg}) == sentiment


def _request(method: str, path: str, headers: dict[str, str], chunks: list[bytes], query: str = ""):
    """A request from another machine whose body arrives in ``chunks``; the list it returns counts reads."""
    from starlette.requests import Request

    reads: list[int] = []

    async def receive() -> dict:
        reads.append(1)
        body = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "scheme": "http", "http_version": "1.1", "server": ("10.0.0.1", 8000),
             "client": ("10.0.0.9", 40000), "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive), reads


def test_the_ingress_checks_the_key_and_the_size_before_it_reads_a_body(planner):
    """The ingress refuses what the replica would refuse, without reading the body first: no key for an
    admin route (401), a declared or a counted body over MOSAIC_MAX_REQUEST_MB (413)."""
    from server.ray.app import mosaic_app
    from server.ray.routing import admitted_body

    planner.settings = planner.settings.model_copy(update={"api_key": "root-key", "max_request_mb": 1})
    app = mosaic_app(planner.settings)
    app.state.mosaic = planner
    chat = json.dumps({"model": "sentiment", "messages": [{"role": "user", "content": "hi"}]}).encode()

    def admit(method, path, headers, chunks):
        req, reads = _request(method, path, headers, list(chunks))
        return asyncio.run(admitted_body(app, req)), reads

    answer, reads = admit("POST", "/v1/adapters", {"content-length": "900000000"}, [b"x" * 10])
    assert answer.status_code == 401 and json.loads(answer.body)["error"]["code"] == "invalid_api_key" and not reads
    answer, reads = admit("POST", "/v1/adapters", {"authorization": "Bearer wrong"}, [b"x"])
    assert answer.status_code == 401 and not reads
    key = {"authorization": "Bearer root-key"}
    answer, reads = admit("POST", "/v1/chat/completions", {**key, "content-length": str(2 << 20)}, [b"x"])
    assert answer.status_code == 413 and "MOSAIC_MAX_REQUEST_MB" in json.loads(answer.body)["error"]["message"]
    assert not reads
    answer, reads = admit("POST", "/v1/chat/completions", key, [b"x" * 600_000] * 3)  # chunked, no length given
    assert answer.status_code == 413 and len(reads) == 2
    # inference is open without a key (MOSAIC_REQUIRE_INFERENCE_KEY unset): the body, whole
    assert admit("POST", "/v1/chat/completions", {}, [chat[:10], chat[10:]])[0] == chat
    assert admit("GET", "/v1/adapters", key, [])[0] == b""
    # a key limited to the read scope may not upload: 403 before the body
    token, _ = planner.keys.create("reader", scopes=["read"])
    answer, reads = admit("POST", "/v1/adapters", {"authorization": f"Bearer {token}"}, [b"x"])
    assert answer.status_code == 403 and not reads
    # a JSON body's values are counted as it arrives, as the replica counts them (MOSAIC_MAX_JSON_VALUES)
    ids = json.dumps({"model": "sentiment", "prompt": [1] * 200_000}).encode()
    answer, reads = admit("POST", "/v1/completions", {"content-type": "application/json"},
                          [ids[i:i + 100_000] for i in range(0, len(ids), 100_000)])
    assert answer.status_code == 413 and "MOSAIC_MAX_JSON_VALUES" in json.loads(answer.body)["error"]["message"]
    assert len(reads) < 6  # refused once over, not after reading the rest


def test_the_ingress_counts_a_prompt_before_it_validates_or_decodes_it(planner, monkeypatch):
    """A body the replica refuses for its size is not validated by vLLM's model nor decoded at the ingress:
    it goes to any replica (no model id), which answers its 400."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def not_validated(*a, **kw):
        raise AssertionError("validated at the ingress")

    monkeypatch.setattr(CompletionRequest, "model_validate", not_validated)
    for body in ({"model": "sentiment", "prompt": [1] * 100_000}, {"model": "sentiment", "prompt": [[1]] * 60_000},
                 {"model": "sentiment", "prompt": "a" * 200_000}):
        assert _key(planner, "/v1/completions", body) == ""
    assert _key(planner, "/v1/chat/completions", {"model": "sentiment", "messages": [{"role": "user", "content": "x"}] * 2000}) == ""


def test_planning_at_the_ingress_is_bounded(planner):
    """A router that has not answered within plan_timeout_s: the request goes to any replica (no id)."""
    from server.ray.routing import routing_key

    async def slow_route(text):
        await asyncio.sleep(30)

    async def broken_route(text):
        raise RuntimeError("a bug in planning")

    planner.route = broken_route  # not a refusal: logged, and any replica serves (it plans again and answers)
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": JSON_PROMPT}]}).encode()
    req, _ = _request("POST", "/v1/chat/completions", {}, [body])
    assert asyncio.run(routing_key(planner, req, body, 5)) == ""
    planner.route = slow_route
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": JSON_PROMPT}]}).encode()
    req, _ = _request("POST", "/v1/chat/completions", {}, [body])
    t0 = time.monotonic()
    assert asyncio.run(routing_key(planner, req, body, 0.3)) == ""
    assert time.monotonic() - t0 < 5
    named = json.dumps({"model": "sentiment", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req, _ = _request("POST", "/v1/chat/completions", {}, [named])
    assert asyncio.run(routing_key(planner, req, named, 5)) == planner.registry.info("sentiment").content_id


def test_a_key_limited_to_a_namespace_learns_nothing_of_another_at_the_ingress(planner):
    """`GET /v1/ray/replica?model=b/secret` with a key for namespace a: no adapter id is planned (the same
    answer as for a skill that does not exist), and the replica's list of every adapter it holds is refused;
    inference is planned with the key's namespace, as the replica plans it."""
    from fastapi.testclient import TestClient

    from server.ray.app import mosaic_app
    from server.ray.routing import ADAPTER_HEADER, INFO_PATH, adapter_header, admitted_body, routing_key

    app = mosaic_app(planner.settings)
    app.state.mosaic = planner
    planner.registry.add("a/mine", LoraAdapter.from_dir(DEMO / "uppercase"))
    planner.registry.add("b/secret", LoraAdapter.from_dir(DEMO / "json_extract"))
    secret, mine = planner.registry.info("b/secret").content_id, planner.registry.info("a/mine").content_id
    team_a, _ = planner.keys.create("team-a", ["read", "inference"], namespace="a")
    reader, _ = planner.keys.create("viewer", ["read", "inference"])
    as_a, as_reader = {"authorization": f"Bearer {team_a}"}, {"authorization": f"Bearer {reader}"}

    def key_for(headers, method="GET", path=INFO_PATH, query="", body=b""):
        req, _ = _request(method, path, headers, [body], query)
        assert asyncio.run(admitted_body(app, req)) == body  # past the key check (both keys may read and infer)
        return asyncio.run(routing_key(planner, req, body, 5)), req.scope

    # the exact request, and its control: a skill of another namespace, and one that does not exist
    assert key_for(as_a, query="model=b/secret")[0] == "" and key_for(as_a, query="model=b/ghost")[0] == ""
    assert key_for(as_reader, query="model=b/secret")[0] == secret  # a key for the whole library: routed
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for model in ("b/secret", "sentiment", "auto"):
        body = json.dumps({**chat, "model": model}).encode()
        assert key_for(as_a, "POST", "/v1/chat/completions", body=body)[0] == ""
    own = json.dumps({**chat, "model": "a/mine"}).encode()
    assert key_for(as_a, "POST", "/v1/chat/completions", body=own)[0] == mine
    # the replica's own answer: every adapter it holds spans the library
    class Replica:  # what MosaicReplica.info tells, without Ray
        @staticmethod
        async def info() -> dict:
            return {"adapters": [secret]}

    app.state.ray_replica = Replica
    replica = TestClient(app, client=("10.0.0.9", 40000))  # no lifespan: the planner is the service
    r = replica.get(INFO_PATH, params={"model": "b/secret"}, headers=as_a)
    assert r.status_code == 403 and secret not in r.text, r.text
    assert replica.get(INFO_PATH, headers=as_reader).json() == {"adapters": [secret]}
    # the routing id goes back only to callers who may read the library, and only on a success
    _, scope = key_for(as_reader, query="model=b/secret")
    assert adapter_header(planner, scope, 200, secret) == {ADAPTER_HEADER: secret}
    assert adapter_header(planner, scope, 403, secret) == {}
    _, anonymous = key_for({}, "POST", "/v1/chat/completions", body=json.dumps({**chat, "model": "sentiment"}).encode())
    assert adapter_header(planner, anonymous, 200, "x") == {}  # inference is open, reading is not


def test_replica_placement_rules():
    """Each replica of a node binds its engine to its own cores; a loopback Redis of another node is refused."""
    from server.ray.routing import cpu_list, redis_elsewhere

    cores = list(range(16))
    assert [cpu_list(cores, r, 4) for r in range(4)] == ["0,1,2,3", "4,5,6,7", "8,9,10,11", "12,13,14,15"]
    assert [cpu_list([0, 1], r, 0.875) for r in range(3)] == ["0", "1", "0"]  # a fraction: one core each
    assert cpu_list([2, 3, 6, 7], 1, 2) == "6,7"  # the cores this process may use, not 0..n
    assert cpu_list([0, 1], 0, 8) == "0,1"  # never more than there are
    url = "redis://127.0.0.1:6379/0"
    assert "another node" in redis_elsewhere(url, "head", "worker-1")
    assert redis_elsewhere(url, "head", "head") is None
    assert redis_elsewhere("redis://redis.mosaic.svc:6379/0", "head", "worker-1") is None
    assert redis_elsewhere(url, None, "worker-1") is None  # a Serve config names no node: docs/SCALING.md
    assert "another node" in redis_elsewhere("unix:///run/redis.sock", "head", "worker-1")


# ---- a local Ray cluster, two replicas, the real engine --------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(base_model_dir, tmp_path_factory):
    """`mosaic serve --ray --replicas 2`, as a user starts it: a local Ray cluster, the ingress, two replicas."""
    pytest.importorskip("ray")
    from server.cli.launch import serving

    prefix = new_prefix()
    data = tmp_path_factory.mktemp("ray")
    env = mosaic_env(base_model_dir, BASE, data, prefix, max_cpu_loras="4", max_loras="4", max_model_len="512",
                     kv_cache_gib="1", tool_call_parser="", router="lexical", preload="false")
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    argv = [sys.executable, "-m", "server.cli", "serve", "--ray", "--replicas", "2", "--port", "{port}"]
    try:
        with serving(env, data / "server.log", argv=argv) as (url, proc, ready_s):
            print(f"two replicas ready in {ready_s:.0f} s")
            yield url, env
        assert proc.returncode is not None
    finally:
        import redis

        drop_prefix(redis.Redis.from_url(TEST_REDIS_URL), prefix)


def _chat(url: str, model: str, prompt: str = JSON_PROMPT, timeout: float = 180) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0})


def _upload(url: str, name: str, folder) -> httpx.Response:
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=120)


@pytest.mark.slow
def test_ray_affinity_upload_and_replica_failure(ray_cluster):
    url, _ = ray_cluster
    # an upload through the ingress is served on the next request
    for name in SKILLS:
        assert _upload(url, name, DEMO / name).status_code in (200, 201)
    # requests for a skill after the first land on the replica that loaded it
    served: dict[str, str] = {}
    for name in SKILLS:
        first = _chat(url, name)
        assert first.status_code == 200, first.text
        served[name] = first.headers["x-mosaic-replica"]
        assert first.headers["x-mosaic-adapter"], "a skill is routed by its content id"
        assert json.loads(first.content)["model"] == name
    time.sleep(1)  # Ray's routers learn what each replica holds within a fraction of a second
    for _ in range(3):
        for name in SKILLS:
            r = _chat(url, name)
            assert r.status_code == 200, r.text
            assert r.headers["x-mosaic-replica"] == served[name], (name, served)
    # the base model goes to any replica; the replica's own answer names its process
    victim = served["sentiment"]
    info = httpx.get(f"{url}/v1/ray/replica", params={"model": "sentiment"}, timeout=60).json()
    assert info["replica"] == victim and info["engine_ready"] and info["adapter_loads"] >= 1
    assert any(h for h in info["adapters"]), info
    # killing that replica's process: what was in flight, and what is sent to it right away, gets a 503
    # in OpenAI's error shape (or is served by the other replica), never a hang
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        flying = [pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=150, json={
            "model": "sentiment", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 200, "ignore_eos": True, "temperature": 0}) for _ in range(2)]  # still running at the kill
        time.sleep(1.0)
        os.kill(info["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        answers = [f.result() for f in flying]
    assert time.monotonic() - t0 < 120
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            err = r.json()["error"]
            assert err["type"] == "server_error" and err["code"] == "service_unavailable" and err["message"]
        else:
            assert r.headers["x-mosaic-replica"] != victim
    assert any(r.status_code == 503 for r in answers), "the requests in flight to the killed replica failed"
    # the other replica keeps serving every skill; the library is whole
    for name in SKILLS:
        r = _chat(url, name)
        assert r.status_code == 200, r.text
        assert r.headers["x-mosaic-replica"] != victim
    listed = httpx.get(f"{url}/v1/adapters", timeout=60).json()
    assert {a["id"] if "id" in a else a["name"] for a in listed["data"]} >= set(SKILLS)


def test_serve_config_and_rayservice_name_the_application():
    """deploy/ray-serve.yaml and the RayService's inline copy are valid Ray Serve configs whose args are
    RayOptions (a typo in a setting would fail here, not on a cluster)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.cli.launch import ROOT
    from server.ray.routing import RayOptions

    serve_cfg = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "kuberay-rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    for cfg in (serve_cfg, yaml.safe_load(service["spec"]["serveConfigV2"])):
        schema = ServeDeploySchema.parse_obj(cfg)
        (application,) = schema.applications
        assert application.import_path == "server.ray.app:app"
        options = RayOptions.model_validate(application.args)
        assert set(application.args) <= set(RayOptions.model_fields)
        assert options.env["MOSAIC_MAX_CPU_LORAS"]
    import ray

    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_a_replica_that_died_or_cannot_take_the_request_is_a_503_in_openai_shape():
    """Ray Serve's own errors (ReplicaUnavailableError, …) are not RayErrors: each must still be a 503, before
    the answer starts and mid-stream (an error event and [DONE]), and anything else stays a 500."""
    from ray import exceptions as core
    from ray.serve import exceptions as serve_exceptions
    from ray.serve._private.common import DeploymentID

    from server.ray.routing import failed, rest

    dead = [core.RayActorError(), core.WorkerCrashedError(), core.NodeDiedError("node gone"), core.OutOfMemoryError("oom"),
            serve_exceptions.ReplicaUnavailableError("replica-1"),
            serve_exceptions.DeploymentUnavailableError(DeploymentID(name="MosaicReplica")),
            serve_exceptions.BackPressureError(num_queued_requests=9, max_queued_requests=8)]
    for exc in [*dead, TimeoutError()]:
        answer = failed(exc, 5.0)
        body = json.loads(answer.body)
        assert answer.status_code == 503, type(exc)
        assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == "service_unavailable", body
    assert failed(ValueError("bug"), 5.0).status_code == 500

    class Stream:
        def __init__(self, exc: BaseException) -> None:
            self.exc, self.sent, self.cancelled = exc, False, False

        async def __anext__(self) -> bytes:
            if not self.sent:
                self.sent = True
                return b"data: {}\n\n"
            raise self.exc

        def cancel(self) -> None:
            self.cancelled = True

    async def drain(stream: Stream) -> list[bytes]:
        return [chunk async for chunk in rest(stream, 5.0)]

    for exc in dead:
        stream = Stream(exc)
        chunks = asyncio.run(drain(stream))
        assert chunks[0] == b"data: {}\n\n" and stream.cancelled, type(exc)
        assert b'"code": "service_unavailable"' in chunks[-1] and chunks[-1].endswith(b"data: [DONE]\n\n"), chunks
