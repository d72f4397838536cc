"""Mosaic's LoRAResolver plugin in a plain `vllm serve` (the real vLLM CPU engine, no Mosaic server):
model=<skill> is resolved from Mosaic's Redis and gives the same greedy answer Mosaic gives."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = "Is this review positive or negative? The staff were friendly and the room spotless."


def _chat(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": model, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": PROMPT}]})


def test_plain_vllm_serve_resolves_skills_from_the_registry(server, tmp_path):
    from server.cli.launch import VLLM_SERVE, serving
    from server.core.settings import Settings

    env = {**server["env"], "MOSAIC_RESOLVER": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "MOSAIC_DATA_DIR": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    settings = Settings()
    argv = [*VLLM_SERVE, "--model", env["MOSAIC_BASE_MODEL"], "--port", "{port}",
            "--served-model-name", env["MOSAIC_BASE_MODEL_ID"], "--enable-lora", "--max-lora-rank", str(settings.max_lora_rank),
            "--max-model-len", str(settings.max_model_len), "--dtype", settings.dtype, "--enforce-eager"]
    expected = _chat(server["url"], "sentiment").json()["choices"][0]["message"]["content"]
    with serving(env, tmp_path / "vllm.log", argv=argv) as (url, _, _):
        r = _chat(url, "sentiment")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected  # same adapter, same engine, greedy
        assert _chat(url, "sentiment@1").status_code == 200  # a pinned version resolves too
        assert _chat(url, "no-such-skill").status_code == 404
        # the adapter was written into the content-addressed folder Mosaic itself uses
        assert len(list((Path(tmp_path) / "adapters").iterdir())) == 1
