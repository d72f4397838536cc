"""The library compressed to MoS shards by the running server, served unchanged by the real vLLM
engine, then restored bit for bit (--keep-originals) — through the HTTP API and the openai client."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time

import httpx
import pytest

from bench.demo_data import examples, exact_match
from tests.helpers import DEMO
from tests.helpers import BASE, JSON_PROMPT

pytestmark = pytest.mark.slow

OPTIONS = {"shard_width": 4, "pool_size": 256, "error_budget": 0.5, "keep_originals": True}


def _wait(url: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/admin/compress", timeout=30).json()
        if job["state"] != "running":
            return job
        time.sleep(2)
    raise AssertionError(f"compression still running after {timeout} s: {job}")


def _chat(client, model: str, prompt: str, **extra):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                                       max_tokens=24, extra_body=extra or None)
    return r.choices[0].message.content, r.model_extra["mosaic"]


def _downloaded_weights(url: str, name: str) -> bytes:
    r = httpx.get(f"{url}/v1/adapters/{name}/download", timeout=60)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("adapter_model.safetensors"))
        return tar.extractfile(member).read()


def test_compress_serve_and_restore(client, server):
    url = server["url"]
    before, _ = _chat(client, "json_extract", JSON_PROMPT)
    sha_before = httpx.get(f"{url}/v1/adapters/json_extract", timeout=30).json()["sha256"]

    r = httpx.post(f"{url}/v1/admin/compress", json=OPTIONS, timeout=30)
    assert r.status_code == 202 and r.json()["state"] == "running"
    if httpx.get(f"{url}/v1/admin/compress", timeout=30).json()["state"] == "running":
        again = httpx.post(f"{url}/v1/admin/compress", json=OPTIONS, timeout=30)
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    job = _wait(url)
    assert job["state"] == "done", job
    # every skill in shard form (the originals are kept beside them in this run, so Redis holds more, not less)
    assert {v["stored"] for v in job["report"]["versions"]} == {"shards"}

    shown = httpx.get(f"{url}/v1/adapters/sentiment", timeout=30).json()
    assert shown["sha256"] == hashlib.sha256((DEMO / "sentiment" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert shown["mos"]["pool_version"] >= 1 and 0 < shown["mos"]["error"] <= 0.5
    assert shown["mos"]["bytes"] * 4 < shown["size"]

    # served from the shards: the skill still does its task, by name, by auto-routing, in a composition
    test = examples("sentiment", "test", 4)
    right = 0
    for prompt, answer in test:
        text, meta = _chat(client, "sentiment", prompt)
        assert meta["skills"] == ["sentiment@1"]
        right += exact_match(text, answer)
    assert right >= 3, right
    _, meta = _chat(client, "auto", "Is this review positive or negative? I found the pizza delightful.")
    assert meta["skills"] == ["sentiment@1"]
    text, meta = _chat(client, BASE, JSON_PROMPT, composition={"skills": ["json_extract", "sentiment"],
                                                                "weights": [1.0, 0.5]})
    assert meta["skills"] == ["json_extract@1", "sentiment@1"] and text

    # an upload now is encoded against the current pools
    files = [("files", (f, (DEMO / "uppercase" / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    up = httpx.post(f"{url}/v1/adapters", data={"name": "upper-late"}, files=files, timeout=120)
    assert up.status_code == 201 and up.json()["mos"]["pool_version"] == shown["mos"]["pool_version"]
    prompt, answer = examples("uppercase", "train", 1, seed=9)[0]
    text, _ = _chat(client, "upper-late", prompt)
    assert exact_match(text, answer), (prompt, text)

    # back to exact storage: the uploads come back bit for bit, and so do the answers
    r = httpx.post(f"{url}/v1/admin/compress", json={"off": True}, timeout=30)
    assert r.status_code == 202
    assert _wait(url)["state"] == "done"
    assert _downloaded_weights(url, "json_extract") == (DEMO / "json_extract" / "adapter_model.safetensors").read_bytes()
    restored = httpx.get(f"{url}/v1/adapters/json_extract", timeout=30).json()
    assert restored["sha256"] == sha_before and not (restored["mos"] or {}).get("pool_version")
    assert _chat(client, "json_extract", JSON_PROMPT)[0] == before
    assert httpx.delete(f"{url}/v1/adapters/upper-late", timeout=30).status_code == 200
