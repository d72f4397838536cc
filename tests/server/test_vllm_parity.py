"""Mosaic's OpenAI surface is vLLM's: the same requests sent to a plain vLLM OpenAI server (same engine
arguments, Mosaic's own adapter folders as --lora-modules) and to Mosaic get equal answers, field by
field; and clients that no one here wrote (langchain-openai, lm-evaluation-harness, vLLM's benchmark
client) work through Mosaic as through vLLM."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from composer.spec import Composition
from server.cli.launch import ROOT, VLLM_SERVE, serving
from server.core.engine import cpu_preload, vllm_cli_args
from server.core.settings import Settings

pytestmark = pytest.mark.slow

SKILL = "sentiment"
COMPOSITION = {"skills": ["sentiment", "json_extract"], "weights": [1.0, 0.5]}
LORAS = ["sentiment", "reverse_list", "json_extract"]  # served by both under these names; "combo" = COMPOSITION
IGNORED = {"id", "created", "system_fingerprint", "mosaic"}

REVIEW = [{"role": "user", "content": "Is this review positive or negative? The soup was cold and bland."}]
PERSON_TEXT = [{"role": "user", "content": "Extract the person as JSON: Ada is 36 years old and lives in London."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def chat(**kw) -> tuple[str, dict]:
    return "chat", {"messages": REVIEW, **GREEDY, **kw}


def completion(**kw) -> tuple[str, dict]:
    return "completion", {"prompt": "Review: the soup was cold and bland. Positive or negative?", **GREEDY, **kw}


def good_cases(yes_id: int, stop_id: int) -> list[tuple[str, dict]]:
    """Every field of vLLM's protocol that clients rely on, each in a request that would show it ignored."""
    return [
        chat(),
        chat(stream=True),
        chat(stream=True, stream_options={"include_usage": True}),
        chat(logprobs=True, top_logprobs=3),
        chat(stream=True, logprobs=True, top_logprobs=2),
        chat(n=2, temperature=0.9, seed=7),
        chat(temperature=0.8, top_k=5, seed=3),
        chat(temperature=0.8, min_p=0.3, seed=3),
        chat(temperature=0.7, top_p=0.5, seed=11),
        chat(repetition_penalty=1.5, max_tokens=24),
        chat(presence_penalty=1.5, frequency_penalty=1.0, max_tokens=24),
        chat(min_tokens=10, max_tokens=12),
        chat(stop=["ive"]),
        chat(stop_token_ids=[stop_id]),
        chat(logit_bias={str(yes_id): 100}, max_tokens=3),
        chat(max_completion_tokens=5),
        chat(structured_outputs={"choice": ["positive", "negative"]}),
        chat(structured_outputs={"regex": "[a-z]+ [0-9]{2}"}),
        chat(structured_outputs={"grammar": 'root ::= "yes" | "no"'}),
        ("chat", {"messages": PERSON_TEXT, "temperature": 0, "max_tokens": 40,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
        ("chat", {"messages": PERSON_TEXT, "temperature": 0, "max_tokens": 30, "response_format": {"type": "json_object"}}),
        ("chat", {"messages": WEATHER, "temperature": 0, "max_tokens": 60, "tools": TOOLS,
                  "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ("chat", {"messages": WEATHER, "temperature": 0, "max_tokens": 60, "tools": TOOLS, "tool_choice": "required"}),
        ("chat", {"messages": WEATHER, "temperature": 0, "max_tokens": 30, "tools": TOOLS, "tool_choice": "auto"}),
        completion(),
        completion(stream=True),
        completion(stream=True, stream_options={"include_usage": True}),
        completion(echo=True, logprobs=1, max_tokens=1),  # lm-eval's log-likelihood request
        completion(logprobs=3),
        completion(prompt_logprobs=2, max_tokens=2),
        completion(n=2, temperature=0.9, seed=5),
        ("completion", {"prompt": ["The capital of France is", "Reverse the list: a, b, c"], **GREEDY}),
        ("completion", {"prompt": [504, 3575, 282, 4649, 314], **GREEDY}),
        completion(return_token_ids=True, max_tokens=4),
    ]


def bad_cases() -> list[tuple[str, dict]]:
    """Parameter errors: vLLM answers each with a 4xx, Mosaic with the same status."""
    return [
        completion(min_tokens=10, max_tokens=2),
        completion(seed=2**64),
        completion(temperature=-1),
        completion(top_p=0),
        completion(n=0),
        completion(logprobs=50),
        chat(top_logprobs=50, logprobs=True),
        chat(max_tokens=100_000),
        ("chat", {"messages": [], **GREEDY}),
        chat(response_format={"type": "bogus"}),
        ("chat", {"messages": WEATHER, **GREEDY, "tools": TOOLS,
                  "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}),
        chat(n=2),  # several greedy choices
    ]


def _strip(value, drop_model: bool):
    if isinstance(value, dict):
        return {k: _strip(v, drop_model) for k, v in value.items() if k not in IGNORED and not (drop_model and k == "model")}
    if isinstance(value, list):
        return [_strip(v, drop_model) for v in value]
    return value


def _difference(a, b, path: str = "") -> str:
    """Where two JSON values first differ, and the two values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _difference(x, y, f"{path}[{i}]")
        return f"{path or '.'}: mosaic has {len(a)} entries, vllm {len(b)}"
    return f"{path or '.'}: mosaic {json.dumps(a)[:300]} / vllm {json.dumps(b)[:300]}"


JOINED = {"content", "text", "arguments", "reasoning_content"}  # streamed in pieces: the pieces join


def _merge(acc, new, key: str | None = None):
    """Two stream events as one: pieces of text join, lists of indexed entries (choices, tool calls) merge by
    index, other lists (log-probabilities per token) append, any other value is the later one."""
    if new is None or acc is None:
        return acc if new is None else new
    if isinstance(acc, dict) and isinstance(new, dict):
        return {**acc, **{k: _merge(acc.get(k), v, k) for k, v in new.items()}}
    if isinstance(acc, list) and isinstance(new, list):
        if all(isinstance(x, dict) and "index" in x for x in acc + new):
            merged = {x["index"]: x for x in acc}
            for x in new:
                merged[x["index"]] = _merge(merged.get(x["index"]), x)
            return [merged[i] for i in sorted(merged)]
        return acc + new
    if isinstance(acc, str) and isinstance(new, str) and key in JOINED:
        return acc + new
    return new


def _folded(events: list) -> dict:
    """A stream as what it says, whatever its grouping: vLLM puts into one event every token the engine made
    since the API process last read, so how many tokens an event holds depends on timing, not on the server."""
    merged = None
    for event in events:
        if isinstance(event, dict):
            merged = _merge(merged, event)
    return {"events": merged, "trailer": [e for e in events if not isinstance(e, dict)]}


def _events(raw: str) -> list:
    """An SSE body as vLLM frames it: every event is ``data: ...`` followed by a blank line."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events[:3]
    return [e[len("data: "):] if e.endswith("[DONE]") else json.loads(e[len("data: "):]) for e in events]


def _send(url: str, api: str, body: dict) -> tuple[int, object, httpx.Response]:
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    r = httpx.post(url + path, json=body, timeout=300)
    if r.status_code != 200:
        return r.status_code, None, r
    return 200, _events(r.text) if body.get("stream") else r.json(), r


@pytest.fixture(scope="module")
def plain(server, client, tmp_path_factory):
    """A plain vLLM OpenAI server on Mosaic's own adapter folders (materialised by asking Mosaic first)."""
    env, data = server["env"], Path(server["env"]["MOSAIC_DATA_DIR"])
    base = env["MOSAIC_BASE_MODEL_ID"]
    for name in LORAS:
        client.completions.create(model=name, prompt="hi", max_tokens=1)
    client.completions.create(model=base, prompt="hi", max_tokens=1, extra_body={"composition": COMPOSITION})
    settings = Settings(**{k[len("MOSAIC_"):].lower(): v for k, v in env.items()
                                           if k.startswith("MOSAIC_") and k[len("MOSAIC_"):].lower() in Settings.model_fields})
    ids = {name: httpx.get(f"{server['url']}/v1/adapters/{name}").json()["content_id"] for name in LORAS}
    folders = {name: data / "adapters" / cid for name, cid in ids.items()}
    folders["combo"] = data / "compositions" / Composition.model_validate(COMPOSITION).content_key(
        [ids[s] for s in COMPOSITION["skills"]], settings.max_lora_rank)
    assert all((f / "adapter_config.json").exists() for f in folders.values()), folders
    argv = [*VLLM_SERVE, *vllm_cli_args(settings, Path(env["MOSAIC_BASE_MODEL"]), base), "--port", "{port}",
            "--lora-modules", *(f"{name}={folder}" for name, folder in folders.items())]
    vllm_env = {**env, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}
    if "VLLM_CPU_OMP_THREADS_BIND" not in env and len(cores := sorted(os.sched_getaffinity(0))) > 1:
        # vLLM's CPU engine binds its threads to the first core (Mosaic's does): this one computes on the last,
        # so the two answer each case side by side
        vllm_env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[-1])
    if preload := cpu_preload(vllm_env):  # as `mosaic serve` preloads for Mosaic
        vllm_env["LD_PRELOAD"] = preload
    log = tmp_path_factory.mktemp("plain-vllm") / "vllm.log"
    with serving(vllm_env, log, timeout=600, argv=argv) as (url, _, _):
        yield {"url": url, "base": base, "mosaic": server["url"], "model_dir": env["MOSAIC_BASE_MODEL"]}


def _targets(plain: dict) -> dict[str, tuple[dict, dict]]:
    """target -> (the request fields for Mosaic, for plain vLLM)."""
    base = plain["base"]
    return {
        "base": ({"model": base}, {"model": base}),
        "skill": ({"model": SKILL}, {"model": SKILL}),
        "composition": ({"model": base, "composition": COMPOSITION}, {"model": "combo"}),
    }


def test_parity_with_plain_vllm(plain):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain["model_dir"])
    yes_id, stop_id = tok.encode("yes")[0], tok.encode("\n")[0]
    good = good_cases(yes_id, stop_id)
    targets = _targets(plain)
    corpus = [("skill", api, body) for api, body in good + bad_cases()]
    corpus += [(t, api, body) for t in ("base", "composition") for api, body in good[:8] + good[19:21] + good[24:29]]
    assert len(corpus) >= 40
    mismatches, served = [], 0
    # each case to both servers at once (each answers one request at a time); streams are compared folded
    with ThreadPoolExecutor(2) as pool:
        for target, api, body in corpus:
            ours, theirs = targets[target]
            mosaic = pool.submit(_send, plain["mosaic"], api, {**body, **ours})
            s_v, want, r_v = _send(plain["url"], api, {**body, **theirs})
            s_m, got, r_m = mosaic.result()
            case = f"{target} {api} {json.dumps(body)[:160]}"
            if s_m != s_v:
                mismatches.append(f"{case}: status {s_m} vs vLLM {s_v}: {r_m.text[:200]} / {r_v.text[:200]}")
                continue
            if s_m != 200:
                assert set(r_m.json()["error"]) >= {"message", "type", "param", "code"}, r_m.text
                continue
            served += 1
            if not body.get("stream"):
                assert got["model"] == ours["model"] and "mosaic" in got
            else:
                assert got[0]["mosaic"]["plan"] == ("composition" if target == "composition" else target)
                got, want = _folded(got), _folded(want)
            drop_model = target == "composition"
            if _strip(got, drop_model) != _strip(want, drop_model):
                mismatches.append(f"{case}:\n  {_difference(_strip(got, drop_model), _strip(want, drop_model))}")
    assert not mismatches, "\n".join(mismatches)
    assert served >= 35


def test_fields_outside_both_protocols_are_refused(plain):
    r = httpx.post(plain["mosaic"] + "/v1/chat/completions",
                   json={"model": SKILL, "messages": REVIEW, "max_tokens": 2, "temperature_typo": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature_typo"
    assert "temperature_typo" in r.json()["error"]["message"]


def test_streams_carry_the_plan_and_start_with_a_token(plain):
    r = httpx.post(plain["mosaic"] + "/v1/completions",
                   json={"model": SKILL, "prompt": "The cat", "max_tokens": 3, "temperature": 0, "stream": True})
    events = _events(r.text)
    assert json.loads(r.headers["x-mosaic-plan"])["skills"] == [f"{SKILL}@1"]
    assert events[0]["mosaic"]["plan"] == "skill" and events[0]["choices"][0]["text"]  # no empty chunk ahead of it
    assert events[0]["model"] == SKILL


def test_tokenize_detokenize_and_responses(plain):
    for path, body in [("/tokenize", {"model": SKILL, "prompt": "hello world"}),
                       ("/tokenize", {"model": SKILL, "messages": REVIEW}),
                       ("/detokenize", {"model": SKILL, "tokens": [28120, 905]}),
                       ("/v1/responses", {"model": SKILL, "input": "Positive or negative? The soup was cold.",
                                          "max_output_tokens": 8, "temperature": 0})]:
        got, want = httpx.post(plain["mosaic"] + path, json=body, timeout=120), httpx.post(plain["url"] + path, json=body, timeout=120)
        assert got.status_code == want.status_code == 200, (path, got.text, want.text)
        g, w = _strip(got.json(), False), _strip(want.json(), False)
        if path == "/v1/responses":  # its output items carry random ids inside
            g, w = g["output"][0]["content"][0]["text"], w["output"][0]["content"][0]["text"]
            # retrieve and cancel by id answer as vLLM does (without VLLM_ENABLE_RESPONSES_API_STORE: not stored)
            for url, rid in ((plain["mosaic"], got.json()["id"]), (plain["url"], want.json()["id"])):
                fetched = httpx.get(f"{url}/v1/responses/{rid}", timeout=30)
                cancelled = httpx.post(f"{url}/v1/responses/{rid}/cancel", timeout=30)
                assert (fetched.status_code, cancelled.status_code) == (404, 404), (url, fetched.text, cancelled.text)
                assert rid in fetched.json()["error"]["message"]
        assert g == w, (path, g, w)


def test_langchain_structured_output_through_a_skill(plain):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    llm = ChatOpenAI(base_url=plain["mosaic"] + "/v1", api_key="none", model="json_extract", temperature=0, max_tokens=60)
    person = llm.with_structured_output(Person).invoke("Extract the person as JSON: Ada is 36 years old and lives in London.")
    assert isinstance(person, Person) and person.age == 36 and "Ada" in person.name


LM_EVAL_TASKS = {
    "mosaic_sentiment_mc": {
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "sentiment_mc.jsonl"}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{prompt}}\nAnswer:", "doc_to_choice": [" positive", " negative"],
        "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
    },
    "mosaic_reverse_list": {
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "reverse_list.jsonl"}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "ignore_case": True, "ignore_punctuation": False}],
    },
}


def _lm_eval(tmp_path: Path, url: str, model_dir: str) -> dict[str, float]:
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    data = ROOT / "tests" / "data" / "lm_eval"
    for name, task in LM_EVAL_TASKS.items():
        files = {k: str(data / v) for k, v in task["dataset_kwargs"]["data_files"].items()}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **task, "dataset_kwargs": {"data_files": files}}))
    manager = TaskManager(include_path=str(tmp_path))
    scores = {}
    ll = lm_eval.simple_evaluate(
        model="local-completions", tasks=["mosaic_sentiment_mc"], task_manager=manager,
        model_args=f"model=sentiment,base_url={url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
                   "num_concurrent=1,max_retries=1,tokenized_requests=False",
    )
    scores["acc"] = ll["results"]["mosaic_sentiment_mc"]["acc,none"]
    gen = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["mosaic_reverse_list"], task_manager=manager, apply_chat_template=True,
        model_args=f"model=reverse_list,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
    )
    scores["exact_match"] = gen["results"]["mosaic_reverse_list"]["exact_match,none"]
    return scores


def test_lm_eval_scores_equal_through_mosaic_and_vllm(plain, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    (tmp_path / "mosaic").mkdir()
    (tmp_path / "vllm").mkdir()
    ours = _lm_eval(tmp_path / "mosaic", plain["mosaic"], plain["model_dir"])
    theirs = _lm_eval(tmp_path / "vllm", plain["url"], plain["model_dir"])
    assert ours == theirs, (ours, theirs)
    assert ours["acc"] > 0.5  # the sentiment skill scores above chance on its multiple-choice task


def test_vllm_benchmark_client_counts_every_token(plain, tmp_path):
    """``vllm bench serve`` against Mosaic, several adapters: it counts every generated token."""
    from vllm.benchmarks import serve as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    bench_serve.add_cli_args(parser)
    n, out = 12, 8
    args = parser.parse_args([
        "--backend", "openai", "--base-url", plain["mosaic"], "--endpoint", "/v1/completions", "--model", plain["base"],
        "--tokenizer", plain["model_dir"], "--dataset-name", "random", "--random-input-len", "16",
        "--random-output-len", str(out), "--num-prompts", str(n), "--max-concurrency", "4", "--ignore-eos",
        "--lora-modules", *LORAS, "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
        "--seed", "1", "--disable-tqdm",
    ])
    result = bench_serve.main(args)
    assert result["completed"] == n and result["total_output_tokens"] == n * out, result
    assert os.path.exists(tmp_path / "r.json")
