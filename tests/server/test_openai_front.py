"""Mosaic's front of vLLM's OpenAI serving layer, without an engine: what it parses, refuses and counts."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request

from lora.errors import InvalidRequestError
from server.core.settings import Settings
from server.front import endpoints, parse, response, serving


def _request(body, content_type: str = "application/json") -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", content_type.encode())]},
                   receive)


async def _parse(kind: str, body, **kw):
    return await parse.parse(_request(body, **kw), endpoints.endpoint(kind), Settings())


def _parse_now(kind: str, body, **kw):
    return asyncio.run(_parse(kind, body, **kw))


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_vllm_fields_and_composition_are_parsed():
    req, comp = _parse_now("chat", {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2, "min_p": 0.1,
                                         "response_format": {"type": "json_object"}, "composition": {"skills": ["a", "b"]}})
    assert req.logprobs and req.top_logprobs == 2 and req.n == 2 and req.min_p == 0.1
    assert req.response_format.type == "json_object"
    assert list(comp.skills) == ["a", "b"] and not hasattr(req, "composition")
    req, _ = _parse_now("completion", {"model": "m", "prompt": ["a", "b"], "echo": True, "logprobs": 1})
    assert req.echo and req.logprobs == 1 and req.prompt == ["a", "b"]


@pytest.mark.parametrize("kind,body,param", [
    ("chat", {**CHAT, "temprature": 0}, "temprature"),
    ("completion", {"model": "m", "prompt": "x", "guided_json": {}}, "guided_json"),  # a field vLLM removed
    ("tokenize", {"model": "m", "prompt": "x", "extra": 1}, "extra"),
])
def test_fields_outside_the_protocol_are_refused_by_name(kind, body, param):
    with pytest.raises(InvalidRequestError) as e:
        _parse_now(kind, body)
    assert e.value.param == param and param in e.value.message


@pytest.mark.parametrize("raw,ctype", [(b"{", "application/json"), (b"[1]", "application/json"),
                                       (json.dumps(CHAT).encode(), "text/plain")])
def test_bodies_that_are_not_a_json_object_are_400(raw, ctype):
    with pytest.raises(InvalidRequestError):
        _parse_now("chat", raw, content_type=ctype)


def test_bad_values_are_validation_errors_with_their_location():
    with pytest.raises(RequestValidationError) as e:
        _parse_now("chat", {**CHAT, "seed": 2**64})
    assert e.value.errors()[0]["loc"][:2] == ("body", "seed")
    with pytest.raises(RequestValidationError) as e:
        _parse_now("chat", {**CHAT, "composition": {"skills": []}})
    assert e.value.errors()[0]["loc"][:2] == ("body", "composition")
    with pytest.raises(parse.Refused) as e:  # a vLLM validator's own error: vLLM's 400
        _parse_now("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}})
    assert e.value.error.error.code == 400 and response.error_json(e.value.error).status_code == 400


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def test_a_prompt_token_limit_tighter_than_the_context_is_counted_in_front(tokenizer):
    settings = Settings(max_prompt_tokens=8, max_tokens_limit=50)
    service = SimpleNamespace(settings=settings, engine=SimpleNamespace(serving=object(), tokenizer=lambda: tokenizer))
    short, _ = _parse_now("completion", {"model": "m", "prompt": "hello"})
    parse.check_limits(service, endpoints.endpoint("completion"), short)
    for kind, body in [("completion", {"model": "m", "prompt": "word " * 20}),
                       ("completion", {"model": "m", "prompt": [[1] * 9]}),
                       ("chat", CHAT)]:  # the chat template alone is longer than 8 tokens
        req, _ = _parse_now(kind, body)
        with pytest.raises(InvalidRequestError, match="MOSAIC_MAX_PROMPT_TOKENS"):
            parse.check_limits(service, endpoints.endpoint(kind), req)
    # a default the client did not send (completions: max_tokens 16) is capped by the engine, not refused
    few = SimpleNamespace(settings=Settings(max_tokens_limit=4), engine=service.engine)
    req, _ = _parse_now("completion", {"model": "m", "prompt": "hi"})
    parse.check_limits(few, endpoints.endpoint("completion"), req, sent=frozenset({"model", "prompt"}))
    with pytest.raises(InvalidRequestError, match="MOSAIC_MAX_TOKENS_LIMIT"):
        parse.check_limits(few, endpoints.endpoint("completion"), req, sent=frozenset({"max_tokens"}))
    req, _ = _parse_now("chat", {**CHAT, "max_completion_tokens": 51})
    with pytest.raises(InvalidRequestError, match="MOSAIC_MAX_TOKENS_LIMIT"):
        parse.check_limits(SimpleNamespace(settings=Settings(max_tokens_limit=50), engine=service.engine),
                                endpoints.endpoint("chat"), req)


def test_stream_events_keep_vllms_framing_and_get_the_plan_once():
    events = ['data: {"id":"x","model":"mosaic-abc","choices":[{"text":"a"}]}\n\n',
              'data: {"id":"x","model":"mosaic-abc","choices":[{"text":"\\"model\\":\\"mosaic-abc\\""}],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
              "data: [DONE]\n\n"]

    async def source():
        for e in events:
            yield e

    async def collect():
        obs = response.Observation("skill", "s")
        rename = ('"model":"mosaic-abc"', '"model":"sentiment"')
        return [e async for e in response.stream_events(source(), rename, {"plan": "skill"}, obs)]

    out = asyncio.run(collect())
    assert all(e.endswith("\n\n") and e.startswith("data: ") for e in out) and out[-1] == "data: [DONE]\n\n"
    first, second = json.loads(out[0][6:]), json.loads(out[1][6:])
    assert first["model"] == second["model"] == "sentiment" and first["mosaic"] == {"plan": "skill"}
    assert "mosaic" not in second and second["choices"][0]["text"] == '"model":"mosaic-abc"'  # text untouched


def test_an_unexpected_error_mid_stream_ends_it_with_an_error_event_and_done():
    async def source():
        yield 'data: {"id":"x","model":"m","choices":[{"text":"a"}]}\n\n'
        raise RuntimeError("boom at /secret/path on 10.0.0.5:6379")

    async def collect():
        return [e async for e in response.stream_events(source(), None, {"plan": "base"}, response.Observation("base", "b"))]

    out = asyncio.run(collect())
    assert out[-1] == "data: [DONE]\n\n" and all(e.endswith("\n\n") for e in out)
    err = json.loads(out[-2][6:])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "internal_error"
    assert "secret" not in err["message"] and "6379" not in err["message"]  # no paths or hosts leave the server


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_the_openapi_document_publishes_vllms_request_bodies_plus_composition():
    from server.api.app import create_app

    spec = create_app(Settings(engine="hf")).openapi()
    components = spec["components"]["schemas"]
    dangling = {r for r in _refs(spec) if r.removeprefix("#/components/schemas/") not in components}
    assert not dangling
    for path, kind in endpoints.ROUTES.items():
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] and list(body["content"]) == ["application/json"]
        schema = body["content"]["application/json"]["schema"]
        for ref in [schema["$ref"]] if "$ref" in schema else [s["$ref"] for s in schema["anyOf"]]:
            wrapper = components[ref.rsplit("/", 1)[1]]
            assert wrapper["properties"]["composition"]["$ref"] == "#/components/schemas/Composition"
            inner = components[wrapper["allOf"][0]["$ref"].rsplit("/", 1)[1]]
            if kind != "tokenize":  # every field the front parses is published, under the name a client sends
                assert set(inner["properties"]) == parse.field_names(endpoints.endpoint(kind).protocol({}))
    chat = components["ChatCompletionRequest"]["properties"]
    assert {"logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "n", "logit_bias"} <= set(chat)
    assert "/v1/responses/{response_id}" in spec["paths"] and "/v1/responses/{response_id}/cancel" in spec["paths"]
    # a stored skill links to what can be done with it next, each link to an operation that exists
    op_ids = {op["operationId"] for item in spec["paths"].values() for op in item.values() if "operationId" in op}
    for path in ("/v1/adapters", "/v1/compositions"):
        links = spec["paths"][path]["post"]["responses"]["201"]["links"]
        assert {"ShowSkill", "ChatWithSkill", "ComposeWithSkill", "DeleteSkill"} <= set(links)
        assert {link["operationId"] for link in links.values()} <= op_ids


def test_work_is_abandoned_when_the_client_disconnects_first():
    async def scenario(disconnect_after: float):
        messages = asyncio.Queue()
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, messages.get)
        cancelled = asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(0.2)
                return "done"
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def client():
            await asyncio.sleep(disconnect_after)
            await messages.put({"type": "http.disconnect"})

        asyncio.ensure_future(client())
        try:
            return await serving.unless_disconnected(request, work()), cancelled.is_set()
        except serving.ClientGone:
            await asyncio.sleep(0)
            return "gone", cancelled.is_set()

    assert asyncio.run(scenario(1.0)) == ("done", False)
    assert asyncio.run(scenario(0.05)) == ("gone", True)


def test_a_composition_stops_between_modules_when_asked():
    import threading

    from composer import CompositionCancelled, compose
    from tests.helpers import random_adapter

    shapes = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(3)}
    stop = threading.Event()
    stop.set()
    with pytest.raises(CompositionCancelled):
        compose([random_adapter(shapes, r=2, seed=1), random_adapter(shapes, r=2, seed=2)], [1.0, 1.0], stop=stop)


def test_a_composition_over_the_compute_budget_is_refused_before_it_runs(base_spec):
    from adapter_store.skill_info import SkillInfo
    from composer.spec import Composition
    from server.core.adapter_cache import ComposeBudget

    budget = ComposeBudget(base_spec.shapes, max_work=2e12, max_bytes=4 * 2**30)
    infos = [SkillInfo(name=f"s{i}", version=1, sha256="0" * 64, rank=64, target_modules=["q_proj", "v_proj"])
             for i in range(16)]
    budget.check(Composition(skills=tuple(i.name for i in infos), method="ties", rank=8), infos)  # affordable
    with pytest.raises(InvalidRequestError, match="MOSAIC_MAX_COMPOSE_WORK"):
        budget.check(Composition(skills=tuple(i.name for i in infos), method="lego", rank=8, params={"n_init": 16}), infos)
    with pytest.raises(InvalidRequestError, match="MOSAIC_MAX_COMPOSE_GIB"):
        ComposeBudget(base_spec.shapes, 1e18, 2**20).check(Composition(skills=("s0", "s1"), method="ties", rank=8), infos[:2])


def _service(**settings):
    return SimpleNamespace(settings=Settings(**settings), engine=SimpleNamespace(serving=None))


@pytest.mark.parametrize("kind,body,param,setting", [
    ("completion", {"model": "m", "prompt": "hi", "n": 17}, "n", "MOSAIC_MAX_CHOICES"),
    ("completion", {"model": "m", "prompt": "hi", "n": 16, "max_tokens": 2049 // 1}, "max_tokens", "MOSAIC_MAX_TOKENS_LIMIT"),
    ("completion", {"model": "m", "prompt": ["hi"] * 2, "n": 16, "max_tokens": 1025}, "n", "MOSAIC_MAX_REQUEST_TOKENS"),
    ("completion", {"model": "m", "prompt": "hi", "n": 9, "use_beam_search": True, "max_tokens": 4000 // 1}, "max_tokens",
     "MOSAIC_MAX_TOKENS_LIMIT"),
    ("chat", {**CHAT, "n": 17}, "n", "MOSAIC_MAX_CHOICES"),
])
def test_what_one_request_may_generate_is_bounded(kind, body, param, setting):
    req, _ = _parse_now(kind, body)
    with pytest.raises(InvalidRequestError) as e:
        parse.check_limits(_service(), endpoints.endpoint(kind), req)
    assert e.value.param == param and setting in e.value.message


def test_generation_within_the_bounds_passes_and_counts_every_prompt_and_choice():
    service = _service()
    for kind, body in [("completion", {"model": "m", "prompt": ["hi"] * 2, "n": 16, "max_tokens": 1024}),
                       ("chat", {**CHAT, "n": 16}),  # no max_tokens: MOSAIC_MAX_TOKENS_LIMIT, 16 × 2048 tokens
                       ("tokenize", {"model": "m", "prompt": "hi"})]:
        req, _ = _parse_now(kind, body)
        parse.check_limits(service, endpoints.endpoint(kind), req)
    req, _ = _parse_now("completion", {"model": "m", "prompt": ["hi"] * 3, "max_tokens": 10})
    assert parse.prompt_count(req) == 3 and parse.generated_tokens(service.settings, req) == 10
    with pytest.raises(InvalidRequestError, match="3 prompt"):
        parse.check_limits(_service(max_request_tokens=29), endpoints.endpoint("completion"), req)


@pytest.mark.parametrize("kind,body,param,setting", [
    ("completion", {"model": "m", "prompt": [1] * 2048}, "prompt", "MOSAIC_MAX_PROMPT_TOKENS"),
    ("completion", {"model": "m", "prompt": [[1], [1] * 2048]}, "prompt", "MOSAIC_MAX_PROMPT_TOKENS"),
    ("completion", {"model": "m", "prompt": [[1]] * 33}, "prompt", "MOSAIC_MAX_PROMPTS"),
    ("completion", {"model": "m", "prompt": ["a"] * 33}, "prompt", "MOSAIC_MAX_PROMPTS"),
    ("completion", {"model": "m", "prompt": "a" * 100_001}, "prompt", "MOSAIC_MAX_PROMPT_CHARS"),
    ("tokenize", {"model": "m", "prompt": [1] * 2048}, "prompt", "MOSAIC_MAX_PROMPT_TOKENS"),
    ("detokenize", {"model": "m", "tokens": [1] * 2049}, "tokens", "MOSAIC_MAX_MODEL_LEN"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}] * 1025}, "messages", "MOSAIC_MAX_MESSAGES"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 1024}]},
     "messages", "MOSAIC_MAX_MESSAGES"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 100_001}]}]},
     "messages", "MOSAIC_MAX_PROMPT_CHARS"),
    ("responses", {"model": "m", "input": [{"role": "user", "content": "x"}] * 1025}, "input", "MOSAIC_MAX_MESSAGES"),
])
def test_sizes_are_counted_as_sent_before_vllm_validates_anything(kind, body, param, setting, monkeypatch):
    def not_validated(*a, **kw):
        raise AssertionError("validated before the limits were checked")

    monkeypatch.setattr(parse, "_validate", not_validated)
    with pytest.raises(InvalidRequestError) as e:
        _parse_now(kind, body)
    assert e.value.param == param and setting in e.value.message


def test_json_bodies_are_counted_while_they_arrive():
    from server.edge.limits import BodySizeLimit

    async def run(raw: bytes, ctype: bytes = b"application/json") -> int:
        chunks = [raw[i:i + 1000] for i in range(0, len(raw), 1000)]
        sent = []

        async def receive():
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        async def app(scope, receive_, send):
            while (await receive_()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-type", ctype)]}
        try:
            await BodySizeLimit(app, Settings(max_json_values=100))(scope, receive, send)
        except Exception as exc:  # raised inside the body's reading: FastAPI answers it as 413
            return exc.status_code
        return sent[0]["status"]

    assert asyncio.run(run(json.dumps({"prompt": [1] * 98}).encode())) == 200
    assert asyncio.run(run(json.dumps({"prompt": [1] * 101}).encode())) == 413
    assert asyncio.run(run(json.dumps({"prompt": [1] * 101}).encode(), b"")) == 413  # FastAPI parses it as JSON too
    assert asyncio.run(run(b"a,b," * 100, b"multipart/form-data; boundary=x")) == 200  # an upload is not JSON


def test_auto_decides_again_when_its_choice_is_deleted_before_it_is_served(monkeypatch):
    """The load test's churn: ``auto`` chose a skill deleted a moment later; the client named a valid model."""
    from lora.errors import NotFoundError

    decided, served = [], []

    async def plan_for(service, model, composition, text, namespace):
        decided.append(model)
        return f"plan{len(decided)}"

    async def serve_plan(service, plan):
        served.append(plan)
        if plan == "plan1":
            raise NotFoundError("the skill 'churn-1' does not exist")
        return "adapter", plan

    monkeypatch.setattr(serving, "plan_for", plan_for)
    monkeypatch.setattr(serving, "serve_plan", serve_plan)
    request = SimpleNamespace(scope={})
    assert asyncio.run(serving.planned(None, request, "auto", None, "hi")) == ("adapter", "plan2")
    assert decided == ["auto", "auto"] and served == ["plan1", "plan2"]
    decided.clear()
    with pytest.raises(NotFoundError):  # a skill the client named is its own mistake
        asyncio.run(serving.planned(None, request, "sentiment", None, "hi"))
    assert decided == ["sentiment"]


def test_a_plan_made_by_the_ray_ingress_is_served_without_planning_again(monkeypatch):
    """Under Ray the ingress plans a request to route it, and hands the plan to the replica in the ASGI scope
    (PLANNED): the replica serves that plan (the router does not run twice); without one, it plans."""
    from router.plan import Plan
    from server.core.planner import PLANNED

    decided = []

    async def plan_for(service, model, composition, text, namespace):
        decided.append(model)
        return Plan(kind="base", reason="planned here")

    async def serve_plan(service, plan):
        return "adapter", plan

    monkeypatch.setattr(serving, "plan_for", plan_for)
    monkeypatch.setattr(serving, "serve_plan", serve_plan)
    handed = Plan(kind="skill", skill="sentiment@2", reason="planned by the ingress")
    request = SimpleNamespace(scope={PLANNED: handed.model_dump(mode="json")})
    assert asyncio.run(serving.planned(None, request, "auto", None, "hi")) == ("adapter", handed) and decided == []
    assert asyncio.run(serving.planned(None, SimpleNamespace(scope={}), "auto", None, "hi"))[1].reason == "planned here"
    assert decided == ["auto"]


def test_the_generation_bound_reads_the_largest_max_tokens_field():
    """vLLM's chat reads max_completion_tokens before max_tokens: a small max_tokens beside it counts for nothing."""
    req, _ = _parse_now("chat", {**CHAT, "n": 16, "max_tokens": 1, "max_completion_tokens": 2048})
    assert parse.generated_tokens(Settings(), req) == 2048
    with pytest.raises(InvalidRequestError, match="MOSAIC_MAX_REQUEST_TOKENS"):
        parse.check_limits(_service(max_request_tokens=1000), endpoints.endpoint("chat"), req)


def test_a_body_with_two_content_types_is_counted_as_starlette_reads_it():
    from server.edge.limits import BodyMeter

    def meter(*types: bytes) -> BodyMeter:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                 "headers": [(b"content-type", t) for t in types]}
        return BodyMeter(Settings(max_json_values=10), scope)

    for types in [(b"application/json", b"text/plain"), (b"text/plain",), (b"application/json",), ()]:
        assert meter(*types).add(b"[" + b"1," * 20 + b"1]") is not None, types  # counted: 413
    assert meter(b"multipart/form-data; boundary=x").add(b"," * 100) is None  # an upload is not JSON
