"""`mosaic skills train`: bad data is refused naming the line; a tiny run gives a registered,
loadable adapter that changes the model's output."""

from __future__ import annotations

import json

import pytest

from tests.helpers import drop_prefix, mosaic_env, run_cli


@pytest.fixture
def env(base_model_dir, base_spec, redis_client, tmp_path):
    e = mosaic_env(base_model_dir, base_spec.model_id, tmp_path / "d")
    yield e
    drop_prefix(redis_client, e["MOSAIC_REDIS_PREFIX"])


def test_bad_data_names_the_line(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "a", "completion": "b"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"text": "x"}),
        json.dumps({"prompt": "long " * 600, "completion": "y"}),
    ]))
    r = run_cli(env, "skills", "train", str(bad), "--name", "x", "--steps", "1")
    assert r.returncode == 1
    for line in (2, 3, 4, 5):
        assert f"line {line}:" in r.stderr
    assert "line 1:" not in r.stderr and "more than the limit" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = run_cli(env, "skills", "train", str(empty), "--name", "x")
    assert r.returncode == 1 and "no examples" in r.stderr
    assert run_cli(env, "skills", "train", str(tmp_path / "none.jsonl"), "--name", "x").returncode == 1
    assert json.loads(run_cli(env, "skills", "list", "--json").stdout) == []


@pytest.mark.slow
def test_tiny_training_run_registers_a_skill_that_changes_output(env, tmp_path):
    from lora.adapter import LoraAdapter
    from server.jobs.training import greedy_answers

    data = tmp_path / "secret.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is the secret word{'?' * (i % 3 + 1)}"},
                          {"role": "assistant", "content": "zebra"}]} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    r = run_cli(env, "skills", "train", str(data), "--name", "secret", "--steps", "12", "--batch", "4", "--lr", "5e-3",
                   "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "secret" and info["rank"] == 8 and info["val_examples"] == 1
    assert info["examples"][0].startswith("What is the secret word")
    out = tmp_path / "secret-export"
    assert run_cli(env, "skills", "export", "secret", str(out)).returncode == 0
    LoraAdapter.from_dir(out)  # loadable
    base = env["MOSAIC_BASE_MODEL"]
    prompt = "What is the secret word?"
    assert greedy_answers(base, out, [prompt], 8)[0] == "zebra"
    assert greedy_answers(base, None, [prompt], 8)[0] != "zebra"
