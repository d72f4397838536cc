"""Serving through the stock openai client against the real server with the real vLLM engine."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import openai
import pytest

from server.cli.launch import ROOT
from tests.helpers import BASE, DEMO, JSON_PROMPT

pytestmark = pytest.mark.slow

COMPOSITION = {"skills": ["json_extract", "sentiment"], "weights": [1.0, 0.5]}


def _ask(client, target: str, api: str, stream: bool, prompt: str = JSON_PROMPT, max_tokens: int = 24):
    """One request; returns (text, mosaic field, finish_reason)."""
    model, extra = (target, {}) if target != "composition" else (BASE, {"composition": COMPOSITION})
    common = dict(model=model, temperature=0, max_tokens=max_tokens, extra_body=extra or None)
    if api == "chat":
        if not stream:
            r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
            return r.choices[0].message.content, r.model_extra["mosaic"], r.choices[0].finish_reason
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=True, **common))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[0].model_extra["mosaic"], chunks[-1].choices[0].finish_reason
    if not stream:
        r = client.completions.create(prompt=prompt, **common)
        return r.choices[0].text, r.model_extra["mosaic"], r.choices[0].finish_reason
    chunks = list(client.completions.create(prompt=prompt, stream=True, **common))
    return "".join(c.choices[0].text for c in chunks), chunks[0].model_extra["mosaic"], chunks[-1].choices[0].finish_reason


def test_models_lists_base_skills_and_auto(client):
    ids = {m.id for m in client.models.list().data}
    assert {BASE, "auto"} | {d.name for d in DEMO.iterdir()} <= ids


@pytest.mark.parametrize("target", [BASE, "json_extract", "composition"])
@pytest.mark.parametrize("api", ["chat", "completion"])
def test_stream_and_non_stream_agree(client, target, api):
    text, mosaic, finish = _ask(client, target, api, stream=False)
    streamed, mosaic_s, finish_s = _ask(client, target, api, stream=True)
    assert text == streamed  # greedy: the same tokens either way
    assert text or api == "completion"  # a raw prompt may get an immediate end-of-text from a chat skill
    assert finish == finish_s and finish in ("stop", "length")
    expected_plan = {BASE: "base", "json_extract": "skill", "composition": "composition"}[target]
    assert mosaic["plan"] == mosaic_s["plan"] == expected_plan
    if target == "composition":
        assert mosaic["skills"] == ["json_extract@1", "sentiment@1"] and mosaic["weights"] == [1.0, 0.5]
        assert mosaic["method"] == "linear" and mosaic["cache"] in ("hit", "miss") and mosaic_s["cache"] == "hit"
    if target == "json_extract":
        assert mosaic["skills"] == ["json_extract@1"]


def test_skill_changes_the_answer(client):
    skill, _, _ = _ask(client, "json_extract", "chat", stream=False, max_tokens=40)
    base, _, _ = _ask(client, BASE, "chat", stream=False, max_tokens=40)
    assert json.loads(skill) == {"name": "Ada", "age": 36, "city": "London"}
    assert skill != base


def test_composition_is_cached_by_content(client):
    comp = {"skills": ["json_extract", "reverse_list"], "weights": [0.7, 0.3], "method": "svd", "rank": 8}
    kinds = []
    for _ in range(2):
        r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": JSON_PROMPT}], temperature=0,
                                           max_tokens=8, extra_body={"composition": comp})
        kinds.append(r.model_extra["mosaic"]["cache"])
        assert r.model_extra["mosaic"]["rank"] == 8
    assert kinds == ["miss", "hit"]


def test_skill_output_equals_vllm_offline_generate(client, server, tmp_path):
    """Greedy output through Mosaic == vLLM's own LLM.generate with the same LoRARequest."""
    from transformers import AutoTokenizer

    model_dir = server["env"]["MOSAIC_BASE_MODEL"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [JSON_PROMPT, "Reverse the list: apple, river, tiger"]
    cases = [("json_extract", prompts[0]), ("reverse_list", prompts[1]), (BASE, prompts[1])]
    ours, reqs = [], []
    for model, prompt in cases:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=30)
        ours.append((r.choices[0].message.content, r.usage.completion_tokens))
        ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        lora = None if model == BASE else {"name": model, "id": len(reqs) + 1, "path": str(DEMO / model)}
        reqs.append({"prompt_ids": ids, "max_tokens": 30, "lora": lora})
    (tmp_path / "req.json").write_text(json.dumps(reqs))
    done = subprocess.run([sys.executable, str(ROOT / "tests/server/offline_generate.py"), model_dir, str(tmp_path / "req.json"),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    for (text, n), ref in zip(ours, theirs):
        assert text == ref["text"]
        assert n == len(ref["token_ids"])


def _upload(url: str, name: str, files: dict[str, bytes], **form) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters", data={"name": name, **form},
                      files=[("files", (fname, data)) for fname, data in files.items()], timeout=120)


def test_uploaded_adapter_is_served_on_next_request(client, server):
    folder = DEMO / "json_extract"
    files = {f: (folder / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    r = _upload(server["url"], "uploaded-json", files, description="copy", examples=json.dumps(["Extract: X"]))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["examples"] == ["Extract: X"]
    assert "uploaded-json" in {m.id for m in client.models.list().data}
    text, mosaic, _ = _ask(client, "uploaded-json", "chat", stream=False, max_tokens=40)
    assert mosaic["skills"] == ["uploaded-json@1"]
    assert text == _ask(client, "json_extract", "chat", stream=False, max_tokens=40)[0]
    # an archive upload of the same folder makes version 2, addressable as name@2
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder / "adapter_config.json", "json_extract/adapter_config.json")
        t.add(folder / "adapter_model.safetensors", "json_extract/adapter_model.safetensors")
    r = _upload(server["url"], "uploaded-json", {"skill.tar.gz": buf.getvalue()})
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    assert _ask(client, "uploaded-json@2", "chat", stream=False)[1]["skills"] == ["uploaded-json@2"]
    # download gives back the exact bytes
    d = httpx.get(f"{server['url']}/v1/adapters/uploaded-json/download", timeout=60)
    with tarfile.open(fileobj=io.BytesIO(d.content)) as t:
        got = {Path(m.name).name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    assert got["adapter_model.safetensors"] == files["adapter_model.safetensors"]
    # delete: gone from the list, and a 404 afterwards
    assert httpx.delete(f"{server['url']}/v1/adapters/uploaded-json", timeout=60).json()["deleted"] == ["uploaded-json@1", "uploaded-json@2"]
    assert "uploaded-json" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _ask(client, "uploaded-json", "chat", stream=False)


def test_bad_upload_is_refused_and_changes_nothing(client, server):
    before = httpx.get(f"{server['url']}/v1/adapters", timeout=30).json()
    folder = DEMO / "sentiment"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    bad = {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": b"not safetensors", "x.bin": b"\x80"}
    r = _upload(server["url"], "bad-skill", bad)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "use_dora" in err["message"] and "pickle" in err["message"]
    assert "safetensors" in err["message"]
    assert _upload(server["url"], "auto", {"a": b""}).status_code == 400
    assert httpx.get(f"{server['url']}/v1/adapters", timeout=30).json() == before
    assert _ask(client, "sentiment", "chat", stream=False, max_tokens=4)[0]  # still serving


def test_errors_are_in_openai_shape(client, server):
    url = server["url"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-skill", messages=[{"role": "user", "content": "x"}])
    cases = [
        ({"model": BASE, "messages": []}, 400),
        ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 0}, 400),  # vLLM: greedy n=1
        ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400),
        ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "composition": {"skills": ["json_extract"], "method": "nope"}}, 400),
        ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "composition": {"skills": ["json_extract", "ghost"]}}, 404),
        ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "composition": {"skills": ["json_extract"], "weights": [1, 2]}}, 400),
    ]
    for body, status in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()


def test_auto_routes_by_content(client, server):
    r = client.chat.completions.create(model="auto", temperature=0, max_tokens=4, messages=[
        {"role": "user", "content": "Is this review positive or negative? I found the pizza delightful."}])
    assert r.model_extra["mosaic"]["plan"] == "skill" and r.model_extra["mosaic"]["skills"] == ["sentiment@1"]
    assert r.choices[0].message.content == "positive"
    plan = httpx.post(f"{server['url']}/v1/route", json={"prompt": "What is the boiling point of water?"}, timeout=30).json()
    assert plan["kind"] == "base" and set(plan["scores"]) >= {"json_extract", "sentiment", "reverse_list"}
    for prompt in ["", "   ", "x" * 100_000, "日本語のテキストです"]:
        r = httpx.post(f"{server['url']}/v1/route", json={"prompt": prompt}, timeout=30)
        assert r.status_code == 200 and r.json()["kind"] in ("base", "skill")


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("lego", {}), ("psec", {"temperature": 1.0, "top_k": 1}),
                                           ("dare_ties", {"p": 0.3, "seed": 1})])
def test_every_method_family_is_servable(client, method, params):
    comp = {"skills": ["sentiment", "reverse_list"], "weights": [2.0, 0.5], "method": method, "params": params, "rank": 8}
    r = client.chat.completions.create(model=BASE, temperature=0, max_tokens=4, extra_body={"composition": comp},
                                       messages=[{"role": "user", "content": "Is this review positive or negative? The tea was lovely."}])
    mosaic = r.model_extra["mosaic"]
    assert mosaic["method"] == method and mosaic["rank"] <= 8
    if method == "psec":  # top-1 of softmax(w): all of α on sentiment, which then answers as itself
        assert mosaic["weights"] == [1.0, 0.0]
        assert r.choices[0].message.content == "positive"


def test_compositions_endpoint_stores_a_new_skill(client, server):
    url = server["url"]
    body = {"name": "sent-rev", "skills": ["sentiment", "reverse_list"], "weights": [1.0, 1.0], "method": "svd", "rank": 8}
    r = httpx.post(f"{url}/v1/compositions", json=body, timeout=300)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["rank"] == 8 and info["origin"] == "composition" and info["composition"]["skills"] == ["sentiment@1", "reverse_list@1"]
    assert "sent-rev" in {m.id for m in client.models.list().data}
    assert _ask(client, "sent-rev", "chat", stream=False, max_tokens=4)[1]["skills"] == ["sent-rev@1"]
    bad = httpx.post(f"{url}/v1/compositions", json={**body, "name": "x", "method": "ties", "params": {"density": 7}}, timeout=60)
    assert bad.status_code == 400 and "density" in bad.json()["error"]["message"]
    assert httpx.delete(f"{url}/v1/adapters/sent-rev", timeout=60).status_code == 200


def test_auto_composes_and_follows_library_changes(client, server):
    from bench.route_prompts import MULTI

    prompt, expected = MULTI[0]
    r = client.chat.completions.create(model="auto", temperature=0, max_tokens=8, messages=[{"role": "user", "content": prompt}])
    mosaic = r.model_extra["mosaic"]
    assert mosaic["plan"] == "composition" and mosaic["method"] == "psec"
    assert {s.split("@")[0] for s in mosaic["skills"]} == expected
    assert max(mosaic["weights"]) == 1.0 and min(mosaic["weights"]) > 0  # the strongest at full strength (router/weights.py)
    # a skill uploaded over HTTP is routable on the next request, without a restart; a delete removes it
    url, piglatin = server["url"], "Write this in pig latin: good morning, my friend"
    assert httpx.post(f"{url}/v1/route", json={"prompt": piglatin}, timeout=60).json()["kind"] == "base"
    folder = DEMO / "reverse_list"
    files = {f: (folder / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    examples = ["Write in pig latin: the cat sleeps", "Pig latin please: I like apples",
                "How do you say 'thank you very much' in pig latin?"]
    r = _upload(url, "piglatin", files, description="Rewrites English sentences in pig latin.", examples=json.dumps(examples))
    assert r.status_code == 201
    plan = httpx.post(f"{url}/v1/route", json={"messages": [{"role": "user", "content": piglatin}]}, timeout=60).json()
    assert plan["kind"] == "skill" and plan["skill"] == "piglatin"
    httpx.delete(f"{url}/v1/adapters/piglatin", timeout=60)
    plan = httpx.post(f"{url}/v1/route", json={"prompt": piglatin}, timeout=60).json()
    assert "piglatin" not in plan["scores"] and plan.get("skill") != "piglatin"


def _metric(text: str, sample: str) -> float:
    """The value of one sample line of the Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_requests_tokens_cache_router_and_registry(client, server):
    url = f"{server['url']}/metrics/"
    before = httpx.get(url, timeout=30, follow_redirects=True).text
    _ask(client, "json_extract", "chat", stream=False, max_tokens=2)
    client.chat.completions.create(model="auto", max_tokens=1, messages=[{"role": "user", "content": "Why is the sky blue?"}])
    text = httpx.get(url, timeout=30, follow_redirects=True).text
    assert 'mosaic_requests_total{outcome="ok",plan="skill"}' in text
    assert 'mosaic_composition_cache_total{result="hit"}' in text
    assert "mosaic_request_seconds_bucket" in text and "mosaic_compose_seconds_count" in text
    per_skill = 'mosaic_target_requests_total{outcome="ok",target="json_extract"}'
    assert _metric(text, per_skill) == _metric(before, per_skill) + 1
    tokens = 'mosaic_target_tokens_total{kind="completion",target="json_extract"}'
    assert _metric(text, tokens) == _metric(before, tokens) + 2
    assert _metric(text, 'mosaic_router_decisions_total{decision="base"}') >= 1
    info_ok = 'mosaic_registry_operations_total{op="info",outcome="ok"}'
    assert _metric(text, info_ok) > _metric(before, info_ok)
