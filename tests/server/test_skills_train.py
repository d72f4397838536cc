"""`mosaic skills train`: bad data is refused naming the line; a tiny run gives a registered,
loadable adapter that changes the model's output."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import TEST_REDIS_URL, _drop_prefix
from tests.server.conftest import mosaic_cli


@pytest.fixture
def env(base_spec, redis_client, tmp_path):
    import os

    from server.base_model import prepare
    from server.settings import Settings

    prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
    yield dict(os.environ, MOSAIC_REDIS_URL=TEST_REDIS_URL, MOSAIC_REDIS_PREFIX=prefix, MOSAIC_DATA_DIR=str(tmp_path / "d"),
               MOSAIC_BASE_MODEL=str(prepare(Settings(), quiet=True)), MOSAIC_BASE_MODEL_ID=base_spec.model_id)
    _drop_prefix(redis_client, prefix)


def test_bad_data_names_the_line(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "a", "completion": "b"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"text": "x"}),
        json.dumps({"prompt": "long " * 600, "completion": "y"}),
    ]))
    r = mosaic_cli(env, "skills", "train", str(bad), "--name", "x", "--steps", "1")
    assert r.returncode == 1
    for line in (2, 3, 4, 5):
        assert f"line {line}:" in r.stderr
    assert "line 1:" not in r.stderr and "more than the limit" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = mosaic_cli(env, "skills", "train", str(empty), "--name", "x")
    assert r.returncode == 1 and "no examples" in r.stderr
    assert mosaic_cli(env, "skills", "train", str(tmp_path / "none.jsonl"), "--name", "x").returncode == 1
    assert json.loads(mosaic_cli(env, "skills", "list", "--json").stdout) == []


@pytest.mark.slow
def test_tiny_training_run_registers_a_skill_that_changes_output(env, tmp_path):
    from adapter_store.adapter import LoraAdapter
    from server.training import greedy_answers

    data = tmp_path / "secret.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is the secret word{'?' * (i % 3 + 1)}"},
                          {"role": "assistant", "content": "zebra"}]} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    r = mosaic_cli(env, "skills", "train", str(data), "--name", "secret", "--steps", "12", "--batch", "4", "--lr", "5e-3",
                   "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "secret" and info["rank"] == 8 and info["val_examples"] == 1
    assert info["examples"][0].startswith("What is the secret word")
    out = tmp_path / "secret-export"
    assert mosaic_cli(env, "skills", "export", "secret", str(out)).returncode == 0
    LoraAdapter.from_dir(out)  # loadable
    base = env["MOSAIC_BASE_MODEL"]
    prompt = "What is the secret word?"
    assert greedy_answers(base, out, [prompt], 8)[0] == "zebra"
    assert greedy_answers(base, None, [prompt], 8)[0] != "zebra"
