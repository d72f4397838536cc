"""The serving layer's fast tier: request -> plan -> engine call -> response, through the real app (real
Redis, registry, composer, adapter cache, router, and vLLM's own OpenAI serving objects) over a mocked
engine, as vLLM tests its OpenAI layer on ``MagicMock(spec=AsyncLLM)``. The mock records what each request
asked the engine for (prompt tokens, sampling parameters, LoRA) and answers with scripted outputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest
import torch
from fastapi.testclient import TestClient

from adapter_store.registry import Registry
from lora.adapter import LoraAdapter
from server.api.app import create_app
from server.core import state as state_module
from server.core.engine import VllmEngine, vllm_serve_args
from server.core.settings import Settings
from tests.helpers import DEMO, LOCAL, LOCAL_URL, TEST_REDIS_URL, dense_delta, drop_prefix, new_prefix

REPLY = ["The", " answer", " is", " positive", "."]
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Call:
    """One ``AsyncLLM.generate`` call, as vLLM's serving layer made it."""

    prompt_ids: list[int]
    params: object  # vllm.SamplingParams
    lora: object | None  # vllm.lora.request.LoRARequest


@dataclass
class Script:
    """What the mocked engine answers: these text pieces, one output each; raises before piece ``fail_at``."""

    pieces: list[str] = field(default_factory=lambda: list(REPLY))
    fail_at: int | None = None


class MockedVllm(VllmEngine):
    """:class:`VllmEngine` with vLLM's real OpenAI serving objects (``init_app_state``, real config and
    renderer for the bundled base model) over ``MagicMock(spec=AsyncLLM)``, whose ``generate`` records
    each call and yields :class:`RequestOutput`s from the current :class:`Script`."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: list[Call] = []
        self.script = Script()

    async def start(self) -> None:
        from unittest.mock import MagicMock

        from starlette.datastructures import State
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.renderers import renderer_from_config
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.input_processor import InputProcessor

        args = vllm_serve_args(self.settings, self.model_dir, self.model_id)
        config = AsyncEngineArgs.from_cli_args(args).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        llm = MagicMock(spec=AsyncLLM)
        llm.errored = False
        llm.vllm_config, llm.model_config = config, config.model_config
        llm.renderer = renderer_from_config(config)
        llm.input_processor = InputProcessor(config, llm.renderer)
        llm.generate = self._generate
        serving = State()
        await init_app_state(llm, serving, args, ("generate",))
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._llm, self.serving = llm, serving

    async def _generate(self, prompt, sampling_params, request_id, *, lora_request=None, **_):
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = list(prompt["prompt_token_ids"])
        self.calls.append(Call(prompt_ids, sampling_params, lora_request))
        script, kind = self.script, sampling_params.output_kind
        text, ids = "", []
        for i, piece in enumerate(script.pieces):
            if script.fail_at == i:
                raise RuntimeError("the engine core died")
            new = self._tokenizer.encode(piece, add_special_tokens=False)
            text, ids = text + piece, ids + new
            last = i == len(script.pieces) - 1
            if kind == RequestOutputKind.FINAL_ONLY and not last:
                continue
            delta = kind == RequestOutputKind.DELTA
            out = CompletionOutput(index=0, text=piece if delta else text, token_ids=new if delta else list(ids),
                                   cumulative_logprob=None, logprobs=None, finish_reason="stop" if last else None)
            yield RequestOutput(request_id, None, prompt_ids, None, [out], finished=last)

    def reply_tokens(self) -> int:
        return sum(len(self._tokenizer.encode(p, add_special_tokens=False)) for p in self.script.pieces)


@pytest.fixture(scope="module")
def served(redis_client, base_spec, base_model_dir, tmp_path_factory):
    """The app over the mocked engine, with the demo skills registered; yields (client, engine)."""
    prefix = new_prefix()
    registry = Registry(redis_client, prefix=prefix)
    for d in sorted(DEMO.iterdir()):
        meta = json.loads((d / "mosaic.json").read_text())
        registry.add(d.name, LoraAdapter.from_dir(d), description=meta["description"], examples=meta["examples"])
    settings = Settings(engine="vllm", redis_url=TEST_REDIS_URL, redis_prefix=prefix,
                        data_dir=tmp_path_factory.mktemp("mosaic-data"), base_model=str(base_model_dir),
                        base_model_id=base_spec.model_id, api_key=None)
    engines: list[MockedVllm] = []

    def make_engine(*args) -> MockedVllm:
        engines.append(MockedVllm(*args))
        return engines[-1]

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(state_module, "make_engine", make_engine)
            with TestClient(create_app(settings), client=LOCAL, base_url=LOCAL_URL) as client:
                deadline = time.monotonic() + 120
                while client.get("/health").status_code != 200:
                    assert time.monotonic() < deadline, client.get("/health").text
                    time.sleep(0.1)
                yield client, engines[0]
    finally:
        drop_prefix(redis_client, prefix)


@pytest.fixture
def client(served):
    return served[0]


@pytest.fixture
def engine(served) -> MockedVllm:
    """The mocked engine, its calls forgotten and its script reset for each test."""
    e = served[1]
    e.calls.clear()
    e.script = Script()
    return e


def _chat(client, model: str, text: str = "Say something.", **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}],
                                                     "max_tokens": 7, "temperature": 0, **extra})


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    body, header = r.json(), r.headers.get("x-mosaic-plan")
    assert header is not None and body.get("mosaic") == json.loads(header)  # the plan in the body and in the header
    return body


def _one_call(engine: MockedVllm) -> Call:
    assert len(engine.calls) == 1, engine.calls
    return engine.calls[0]


def _events(r) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def _tensors(folder) -> dict[str, torch.Tensor]:
    return LoraAdapter.from_dir(folder).tensors


# --- the base model -----------------------------------------------------------------------------------

def test_base_chat(client, engine, base_spec):
    body = _ok(_chat(client, base_spec.model_id, "What is the capital of France?"))
    call = _one_call(engine)
    assert call.lora is None and call.params.max_tokens == 7 and call.params.temperature == 0
    prompt = engine.tokenizer().decode(call.prompt_ids)
    # vLLM rendered the messages through the model's chat template, up to the assistant's turn
    assert "What is the capital of France?" in prompt and prompt.rstrip().endswith("assistant"), prompt
    assert body["object"] == "chat.completion" and body["model"] == base_spec.model_id
    choice = body["choices"][0]
    assert choice["message"] == {**choice["message"], "role": "assistant", "content": "".join(REPLY)}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(call.prompt_ids)
    assert body["usage"]["completion_tokens"] == engine.reply_tokens()
    assert body["usage"]["total_tokens"] == len(call.prompt_ids) + engine.reply_tokens()
    assert body["mosaic"]["plan"] == "base" and body["mosaic"]["reason"] == "base model requested"


def test_base_completion(client, engine, base_spec):
    r = client.post("/v1/completions", json={"model": base_spec.model_id, "prompt": "Once upon a time", "max_tokens": 9})
    body = _ok(r)
    call = _one_call(engine)
    assert call.lora is None and call.params.max_tokens == 9
    assert call.prompt_ids == engine.tokenizer()("Once upon a time")["input_ids"]
    assert body["object"] == "text_completion" and body["model"] == base_spec.model_id
    assert body["choices"][0]["text"] == "".join(REPLY) and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {**body["usage"], "prompt_tokens": len(call.prompt_ids),
                             "completion_tokens": engine.reply_tokens()}
    assert body["mosaic"]["plan"] == "base"


# --- skills and compositions ------------------------------------------------------------------------

def test_a_named_skill_is_served_with_its_own_weights(client, engine):
    body = _ok(_chat(client, "sentiment"))
    lora = _one_call(engine).lora
    assert lora is not None
    demo, served = _tensors(DEMO / "sentiment"), _tensors(lora.lora_path)
    assert served.keys() == demo.keys() and all(torch.equal(served[k], demo[k]) for k in demo)
    assert body["model"] == "sentiment"  # the client's name, not the one lent to vLLM
    assert body["mosaic"] == {**body["mosaic"], "plan": "skill", "skills": ["sentiment@1"], "rank": 8}
    # the name lent to vLLM's model registry is taken back once the request is done
    assert lora.lora_name not in engine.serving.openai_serving_models.lora_requests
    _chat(client, "reverse_list")
    other = engine.calls[-1].lora
    assert other.lora_int_id != lora.lora_int_id and other.lora_path != lora.lora_path


def test_a_composition_in_the_body_is_served_composed(client, engine, base_spec):
    comp = {"skills": ["json_extract", "sentiment"], "weights": [1.0, 0.5]}
    body = _ok(_chat(client, base_spec.model_id, composition=comp))
    lora = _one_call(engine).lora
    assert lora is not None
    composed = LoraAdapter.from_dir(lora.lora_path)
    assert composed.rank == 16  # linear, exact: the factors side by side, 8 + 8
    assert body["model"] == base_spec.model_id
    assert body["mosaic"] == {**body["mosaic"], "plan": "composition", "method": "linear", "rank": 16,
                              "skills": ["json_extract@1", "sentiment@1"], "weights": [1.0, 0.5]}
    # ΔW of the composed adapter is the weighted sum of the skills' ΔW (one module checked)
    module = "model.layers.3.self_attn.q_proj"
    parts = [LoraAdapter.from_dir(DEMO / s) for s in comp["skills"]]
    want = sum(w * dense_delta(_only(a, module))[module] for w, a in zip(comp["weights"], parts))
    torch.testing.assert_close(dense_delta(_only(composed, module))[module], want, rtol=1e-5, atol=1e-6)


def _only(adapter: LoraAdapter, module: str) -> LoraAdapter:
    """``adapter`` cut to one module (ΔW of every module would be needless work here)."""
    return LoraAdapter(config=adapter.config, tensors={k: v for k, v in adapter.tensors.items() if f"{module}." in k})


def test_auto_routes_a_clear_prompt_to_its_skill(client, engine):
    body = _ok(_chat(client, "auto", "Is this review positive or negative? I found the pizza delightful."))
    lora = _one_call(engine).lora
    assert lora is not None
    demo, served = _tensors(DEMO / "sentiment"), _tensors(lora.lora_path)
    assert served.keys() == demo.keys() and all(torch.equal(served[k], demo[k]) for k in demo)
    assert body["model"] == "auto"
    assert body["mosaic"] == {**body["mosaic"], "plan": "skill", "skills": ["sentiment@1"]}
    assert body["mosaic"]["scores"]["sentiment"] == max(body["mosaic"]["scores"].values())
    engine.calls.clear()
    body = _ok(_chat(client, "auto", "What is the boiling point of water?"))
    assert _one_call(engine).lora is None and body["mosaic"]["plan"] == "base"


# --- streams ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["chat", "completion"])
def test_a_stream_is_sse_ending_with_done(client, engine, api):
    common = {"model": "sentiment", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
    if api == "chat":
        r = client.post("/v1/chat/completions", json={**common, "messages": [{"role": "user", "content": "Hi"}]})
    else:
        r = client.post("/v1/completions", json={**common, "prompt": "Hi"})
    events = _events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    call = _one_call(engine)
    assert call.lora is not None and call.params.output_kind.name == "DELTA"
    header = r.headers.get("x-mosaic-plan")
    assert header is not None and chunks[0].get("mosaic") == json.loads(header) and json.loads(header)["plan"] == "skill"
    assert all("mosaic" not in c for c in chunks[1:]) and all(c["model"] == "sentiment" for c in chunks)
    texts = [(c["choices"][0]["delta"].get("content") if api == "chat" else c["choices"][0]["text"]) or ""
             for c in chunks if c["choices"]]
    assert "".join(texts) == "".join(REPLY)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == len(call.prompt_ids) and usage["completion_tokens"] == engine.reply_tokens()


@pytest.mark.parametrize("api", ["chat", "completion"])
def test_a_stream_without_usage_is_counted_and_shows_none(client, engine, api):
    """A stream that does not ask for usage gets none (as from vLLM), yet its tokens are counted per skill."""
    from prometheus_client import REGISTRY

    def tokens(kind: str) -> float:
        return REGISTRY.get_sample_value("mosaic_target_tokens_total", {"target": "sentiment", "kind": kind}) or 0.0

    before = tokens("prompt"), tokens("completion")
    common = {"model": "sentiment", "max_tokens": 7, "stream": True}
    if api == "chat":
        r = client.post("/v1/chat/completions", json={**common, "messages": [{"role": "user", "content": "Hi"}]})
    else:
        r = client.post("/v1/completions", json={**common, "prompt": "Hi"})
    events = _events(r)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["choices"] and c.get("usage") is None for c in chunks), chunks
    assert "system_fingerprint" in chunks[-1], chunks[-1]  # on the last event, as plain vLLM sends it
    call = _one_call(engine)
    assert tokens("prompt") - before[0] == len(call.prompt_ids)
    assert tokens("completion") - before[1] == engine.reply_tokens()


# --- errors -----------------------------------------------------------------------------------------

def test_an_unknown_model_is_a_404_and_never_reaches_the_engine(client, engine):
    r = _chat(client, "no-such-skill")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["code"] == "model_not_found" and err["param"] == "model"
    assert "no-such-skill" in err["message"]
    assert engine.calls == []


def test_an_engine_failing_mid_stream_ends_the_stream_with_an_error_then_done(client, engine):
    """The response has started (200): what was generated, then an error event, then [DONE]."""
    engine.script = Script(fail_at=2)
    r = _chat(client, "sentiment", stream=True)
    events = _events(r)
    assert events[-1] == "[DONE]"
    *chunks, error = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(REPLY[:2])
    assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS and error["error"]["message"], error
    # the same terms as a failure before the response started
    assert (error["error"]["type"], error["error"]["code"]) == ("server_error", "internal_error"), error
    assert len(engine.calls) == 1


def test_an_engine_failing_before_a_response_is_a_5xx_in_openai_shape(client, engine, base_spec):
    engine.script = Script(fail_at=0)
    r = _chat(client, base_spec.model_id)
    assert r.status_code >= 500, r.text
    assert set(r.json()["error"]) == ERROR_KEYS and r.json()["error"]["type"] == "server_error"
    assert "mosaic" not in r.json() and json.loads(r.headers["x-mosaic-plan"])["plan"] == "base"


def test_listings_page_through_the_library_in_name_order(client):
    every = [s["name"] for s in client.get("/v1/adapters").json()["data"]]
    assert every == sorted(every) and len(every) >= 8
    seen, after = [], None
    while True:
        r = client.get("/v1/adapters", params={"limit": 3, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [s["name"] for s in body["data"]]
        assert body["last_id"] == body["data"][-1]["name"] and body["first_id"] == body["data"][0]["name"]
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert seen == every
    # /v1/models: the base card and auto on the first page, then skills only
    first = client.get("/v1/models", params={"limit": 2}).json()
    ids = [c["id"] for c in first["data"]]
    assert ids[1:3] == every[:2] and ids[-1] == "auto" and first["has_more"]
    rest = client.get("/v1/models", params={"after": every[1]}).json()
    assert [c["id"] for c in rest["data"]] == every[2:] and not rest["has_more"]
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}):
        r = client.get("/v1/adapters", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "query.limit", (bad, r.text)
