"""Two Mosaic replicas (two server processes, each with the real vLLM engine) on one test-owned Redis:
a change made through one is served by the other on the next request; a Redis outage turns the
library API into 503s while adapters already served keep answering, and both recover by themselves."""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import ExitStack

import httpx
import pytest
import redis

from server.cli.launch import mosaic_cli, serving
from tests.helpers import DEMO, OwnRedis

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]

BASE = "SmolLM2-135M-Instruct"
SENTIMENT = "Is this review positive or negative? The soup was wonderful."


@pytest.fixture(scope="module")
def cluster(server_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    own = OwnRedis(folder / "redis")
    own.start()
    env = {**server_env, "MOSAIC_REDIS_URL": own.url, "MOSAIC_REDIS_PREFIX": f"replicas-{uuid.uuid4().hex[:8]}"}
    done = mosaic_cli(env, "skills", "add", str(DEMO / "sentiment"), "--name", "sentiment")
    assert done.returncode == 0, done.stderr
    with ExitStack() as stack:
        urls = []
        for i in range(2):
            data = folder / f"replica{i}"
            data.mkdir()
            url, _, _ = stack.enter_context(serving({**env, "MOSAIC_DATA_DIR": str(data)}, data / "server.log"))
            urls.append(url)
        yield own, urls
    try:
        redis.Redis.from_url(own.url).shutdown(nosave=True)
    except redis.ConnectionError:
        pass


def _chat(url: str, model: str, prompt: str = SENTIMENT, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": model, "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})


def _upload(url: str, name: str, skill: str) -> httpx.Response:
    folder = DEMO / skill
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    meta = json.loads((folder / "mosaic.json").read_text())
    return httpx.post(f"{url}/v1/adapters", files=files, timeout=120,
                      data={"name": name, "description": meta["description"], "examples": json.dumps(meta["examples"])})


def test_changes_through_one_replica_are_served_by_the_other(cluster):
    _, (a, b) = cluster
    assert _upload(a, "shared", "sentiment").status_code == 201
    r = _chat(b, "shared")  # uploaded on A, served by B on its next request
    assert r.status_code == 200 and r.json()["mosaic"]["skills"] == ["shared@1"]
    first = r.json()["choices"][0]["message"]["content"]
    assert first == _chat(a, "shared").json()["choices"][0]["message"]["content"]
    # a new version through B: A serves version 2 (different weights) on its next request
    assert _upload(b, "shared", "reverse_list").json()["version"] == 2
    reversed_prompt = "Reverse the order of this list: red, green, blue"
    ra, rb = _chat(a, "shared", reversed_prompt, 12).json(), _chat(b, "shared", reversed_prompt, 12).json()
    assert ra["mosaic"]["skills"] == rb["mosaic"]["skills"] == ["shared@2"]
    assert ra["choices"][0]["message"]["content"] == rb["choices"][0]["message"]["content"]
    # the router of B sees the skill uploaded through A
    plan = httpx.post(f"{b}/v1/route", json={"prompt": reversed_prompt}, timeout=60).json()
    assert "shared" in plan["scores"]
    # a delete through A: B answers 404 on its next request, in OpenAI's shape
    assert httpx.delete(f"{a}/v1/adapters/shared", timeout=60).status_code == 200
    gone = _chat(b, "shared")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_redis_outage_library_503_loaded_skills_serve_then_recover(cluster):
    own, (a, _) = cluster
    before = _chat(a, "sentiment")
    assert before.status_code == 200
    auto_before = _chat(a, "auto").json()["mosaic"]
    own.kill()
    try:
        # the library API: a clear 503 in OpenAI's shape
        for r in (httpx.get(f"{a}/v1/adapters", timeout=60), _upload(a, "during-outage", "sentiment")):
            assert r.status_code == 503, r.text
            assert "Redis" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
        # inference on what this replica already served keeps answering, greedy output unchanged
        during = _chat(a, "sentiment")
        assert during.status_code == 200
        assert during.json()["choices"][0]["message"]["content"] == before.json()["choices"][0]["message"]["content"]
        assert _chat(a, "auto").json()["mosaic"]["skills"] == auto_before["skills"]
        assert _chat(a, BASE).status_code == 200
        # a skill this replica never served cannot be checked: 503, not a wrong answer
        assert _chat(a, "never-served").status_code == 503
    finally:
        own.start()
    # Redis is back (its append-only file kept the library): the same process reconnects by itself
    listed = httpx.get(f"{a}/v1/adapters", timeout=60)
    assert listed.status_code == 200 and "sentiment" in {s["name"] for s in listed.json()["data"]}
    assert _upload(a, "after-outage", "sentiment").status_code == 201
    assert httpx.delete(f"{a}/v1/adapters/after-outage", timeout=60).status_code == 200
