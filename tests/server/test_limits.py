"""Every configurable limit is refused with a clear 4xx in OpenAI's shape before any work is done,
and leaves the library unchanged and the server serving (real server, real vLLM engine)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import httpx
import pytest
import torch

from lora.adapter import LoraAdapter, factor_key
from server.core.settings import Settings

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
DEFAULTS = Settings()


def _chat(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": BASE, **body}, timeout=120, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


@pytest.fixture
def unchanged(server, client):
    """The library before and after the test is the same, and the server still answers."""
    before = httpx.get(f"{server['url']}/v1/adapters", timeout=30).json()
    yield server["url"]
    assert httpx.get(f"{server['url']}/v1/adapters", timeout=30).json() == before
    r = client.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": "Great film!"}],
                                       max_tokens=3, temperature=0)
    assert r.choices[0].message.content


def test_composition_skill_count(unchanged):
    skills = [f"s{i}" for i in range(DEFAULTS.max_composition_skills + 1)]  # names need not exist: checked first
    err = _error(_chat(unchanged, {"messages": [{"role": "user", "content": "x"}], "composition": {"skills": skills}}), 400)
    assert err["param"] == "composition.skills" and str(DEFAULTS.max_composition_skills) in err["message"]
    r = httpx.post(f"{unchanged}/v1/compositions", json={"name": "too-many", "skills": skills}, timeout=60)
    assert "MOSAIC_MAX_COMPOSITION_SKILLS" in _error(r, 400)["message"]


def test_prompt_characters_are_capped_before_tokenizing(unchanged):
    huge = "a" * (DEFAULTS.max_prompt_chars + 1)
    err = _error(_chat(unchanged, {"messages": [{"role": "user", "content": huge}]}), 400)
    assert err["param"] == "messages" and "MOSAIC_MAX_PROMPT_CHARS" in err["message"]
    r = httpx.post(f"{unchanged}/v1/completions", json={"model": BASE, "prompt": huge}, timeout=60)
    assert _error(r, 400)["param"] == "prompt"
    r = httpx.post(f"{unchanged}/v1/route", json={"prompt": huge}, timeout=60)
    assert _error(r, 400)["param"] == "prompt"


def test_prompt_tokens(unchanged):
    long = "word " * (DEFAULTS.max_model_len + 10)  # within the character cap, over the token cap
    # with the default limit (the context less one token) vLLM's own context check answers
    err = _error(_chat(unchanged, {"messages": [{"role": "user", "content": long}]}), 400)
    assert "tokens" in err["message"] and str(DEFAULTS.max_model_len) in err["message"]
    r = httpx.post(f"{unchanged}/v1/completions", json={"model": BASE, "prompt": [1] * (DEFAULTS.max_model_len + 1)}, timeout=60)
    assert "tokens" in _error(r, 400)["message"]
    r = httpx.post(f"{unchanged}/v1/completions", json={"model": BASE, "prompt": [10**9]}, timeout=60)
    assert "token" in _error(r, 400)["message"].lower()


def test_max_tokens(unchanged):
    err = _error(_chat(unchanged, {"messages": [{"role": "user", "content": "x"}], "max_tokens": DEFAULTS.max_tokens_limit + 1}), 400)
    assert err["param"] == "max_tokens" and "MOSAIC_MAX_TOKENS_LIMIT" in err["message"]


def test_adapter_rank(unchanged, base_spec):
    r = DEFAULTS.max_adapter_rank + 1
    module = next(n for n in base_spec.shapes if n.endswith("q_proj"))
    d_out, d_in = base_spec.shapes[module]
    adapter = LoraAdapter(
        config={"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj"],
                "base_model_name_or_path": base_spec.model_id},
        tensors={factor_key(module, "A"): torch.zeros(r, d_in, dtype=torch.bfloat16),
                 factor_key(module, "B"): torch.zeros(d_out, r, dtype=torch.bfloat16)},
    )
    files = [("files", ("adapter_config.json", adapter.config_bytes())),
             ("files", ("adapter_model.safetensors", adapter.weights_bytes()))]
    resp = httpx.post(f"{unchanged}/v1/adapters", data={"name": "too-wide"}, files=files, timeout=120)
    assert f"exceeds the maximum {DEFAULTS.max_adapter_rank}" in _error(resp, 400)["message"]


def test_body_size_declared_and_streamed(unchanged):
    # a declared Content-Length over the upload limit is refused before a byte of the body is read
    u = urlparse(unchanged)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/adapters")
    conn.putheader("content-type", "multipart/form-data; boundary=x")
    conn.putheader("content-length", str((DEFAULTS.max_upload_mb + 2) * 2**20))
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "MOSAIC_MAX_UPLOAD_MB" in body["error"]["message"]
    # a chunked body without a length is counted as it arrives
    def chunks():
        yield b'{"model": "' + BASE.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(DEFAULTS.max_request_mb + 1):
            yield b"a" * 2**20
        yield b'"}]}'

    r = httpx.post(f"{unchanged}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert "MOSAIC_MAX_REQUEST_MB" in _error(r, 413)["message"]
