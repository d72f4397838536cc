"""docs/COSTS.md's table, walked: for every row, a request one over the row's bound (the bound lowered for
that request so the request stays small) is refused with the row's status, in OpenAI's error shape naming
the setting, and the library is unchanged (reference engine: these requests never reach it)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lora.adapter import LoraAdapter
from tests.helpers import DEMO, reference_app

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (?P<endpoint>[^|]+) \| (?P<what>[^|]+) \| `(?P<setting>MOSAIC_[A-Z_]+)` \| (?P<default>[^|]+) \| (?P<status>\d{3}) \|$")


def table() -> list[dict]:
    rows = [m.groupdict() for line in (ROOT / "docs" / "COSTS.md").read_text().splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 20, "docs/COSTS.md's table was not found"
    return rows


@pytest.fixture(scope="module")
def client(redis_client):
    with reference_app(redis_client) as c:
        service = c.app.state.mosaic
        for name in ("sentiment", "uppercase"):
            service.registry.add(name, LoraAdapter.from_dir(DEMO / name))
        deadline = time.monotonic() + 300
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, c.get("/health").text
            time.sleep(0.5)
        yield c


def _chat(c, base: str, **body):
    return c.post("/v1/chat/completions", json={"model": base, "messages": [{"role": "user", "content": "hi"}], **body})


def _completion(c, base: str, **body):
    return c.post("/v1/completions", json={"model": base, "prompt": "hi", **body})


def _upload(c, files: dict[str, bytes], **form):
    return c.post("/v1/adapters", data={"name": "cost-probe", **form}, files=[("files", (n, b)) for n, b in files.items()])


def _demo_files(name: str = "sentiment") -> dict[str, bytes]:
    return {f: (DEMO / name / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}


def _compose(c, **body):
    return c.post("/v1/compositions", json={"name": "cost-probe", "skills": ["sentiment", "uppercase"],
                                            "quality_prompts": 0, **body})


def _optimize(c, examples: list, **options):
    return _compose(c, optimize={"examples": examples, **options})


# setting -> (the bound for the probe, the request one over it)
PROBES: dict[str, tuple[float, Callable]] = {
    "MOSAIC_MAX_REQUEST_MB": (1, lambda c, b: c.post("/v1/route", content=b" " * (2**20 + 1),
                                                      headers={"content-type": "application/json"})),
    "MOSAIC_MAX_UPLOAD_MB": (1, lambda c, b: _upload(c, {"adapter_model.safetensors": b"\0" * (2 * 2**20 + 1),
                                                         "adapter_config.json": b"{}"})),
    "MOSAIC_MAX_JSON_VALUES": (100, lambda c, b: _completion(c, b, prompt=[1] * 101)),
    "MOSAIC_MAX_PROMPT_CHARS": (100, lambda c, b: _completion(c, b, prompt="a" * 101)),
    "MOSAIC_MAX_PROMPT_TOKENS": (10, lambda c, b: _completion(c, b, prompt=[1] * 11)),
    "MOSAIC_MAX_PROMPTS": (3, lambda c, b: _completion(c, b, prompt=["a"] * 4)),
    "MOSAIC_MAX_MESSAGES": (3, lambda c, b: _chat(c, b, messages=[{"role": "user", "content": "x"}] * 4)),
    "MOSAIC_MAX_MODEL_LEN": (64, lambda c, b: c.post("/detokenize", json={"model": b, "tokens": [1] * 65})),
    "MOSAIC_MAX_TOKENS_LIMIT": (10, lambda c, b: _chat(c, b, max_tokens=11)),
    "MOSAIC_MAX_CHOICES": (3, lambda c, b: _completion(c, b, n=4, max_tokens=1)),
    "MOSAIC_MAX_REQUEST_TOKENS": (20, lambda c, b: _completion(c, b, n=3, max_tokens=7)),
    "MOSAIC_MAX_COMPOSITION_SKILLS": (1, lambda c, b: _chat(c, b, composition={"skills": ["sentiment", "uppercase"]})),
    "MOSAIC_MAX_COMPOSE_WORK": (1.0, lambda c, b: _compose(c)),
    "MOSAIC_MAX_COMPOSE_GIB": (1e-9, lambda c, b: _compose(c)),
    "MOSAIC_MAX_ADAPTER_RANK": (4, lambda c, b: _upload(c, _demo_files())),
    "MOSAIC_MAX_TENSORS": (4, lambda c, b: _upload(c, _demo_files())),
    "MOSAIC_MAX_EXAMPLES_PER_SKILL": (2, lambda c, b: _upload(c, _demo_files(), examples=json.dumps(["a", "b", "c"]))),
    "MOSAIC_MAX_EXAMPLE_CHARS": (10, lambda c, b: _upload(c, _demo_files(), examples=json.dumps(["a" * 11]))),
    "MOSAIC_MAX_DESCRIPTION_CHARS": (10, lambda c, b: _upload(c, _demo_files(), description="a" * 11)),
    "MOSAIC_MAX_TAGS": (2, lambda c, b: _upload(c, _demo_files(), tags=json.dumps(["a", "b", "c"]))),
    "MOSAIC_MAX_TAG_CHARS": (10, lambda c, b: _upload(c, _demo_files(), tags=json.dumps(["a" * 11]))),
    "MOSAIC_MAX_EXAMPLES": (2, lambda c, b: _optimize(c, [{"prompt": "a", "answer": "b"}] * 3)),
    "MOSAIC_MAX_JOB_TOKENS": (10, lambda c, b: _optimize(c, [{"prompt": "hello there", "answer": "yes"}] * 2, budget=5)),
}


def _library(c) -> list:
    return [(s["name"], s["version"], s["content_id"]) for s in c.get("/v1/adapters").json()["data"]]


@pytest.mark.parametrize("row", table(), ids=lambda r: r["setting"])
def test_one_over_each_bound_is_refused(client, base_spec, row):
    setting = row["setting"]
    assert setting in PROBES, f"docs/COSTS.md names {setting} but no probe sends a request over it"
    field = setting.removeprefix("MOSAIC_").lower()
    settings = client.app.state.mosaic.settings
    default = getattr(settings, field)
    assert float(row["default"]) == float(default), f"docs/COSTS.md says {setting} defaults to {row['default']}, not {default}"
    bound, probe = PROBES[setting]
    before = _library(client)
    setattr(settings, field, type(default)(bound))
    try:
        r = probe(client, base_spec.model_id)
    finally:
        setattr(settings, field, default)
    assert r.status_code == int(row["status"]), f"{setting}: {r.status_code} {r.text[:400]}"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert setting in error["message"], error["message"]
    assert _library(client) == before


def test_a_stored_composition_inherits_at_most_the_examples_a_skill_may_have():
    from types import SimpleNamespace

    from server.jobs.library import inherited_examples

    infos = [SimpleNamespace(examples=[f"{k}{i}" for i in range(50)]) for k in "abc"]
    taken = inherited_examples(infos, 64)
    assert len(taken) == 64 and {t[0] for t in taken[:3]} == {"a", "b", "c"}  # every input keeps a share
    assert sum(t.startswith("c") for t in taken) >= 21
