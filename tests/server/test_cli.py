"""The mosaic CLI against real Redis and the real base model's shapes (no engine needed). Commands run in
this process (tests/helpers.py run_cli); one runs as its own process, as a user starts it."""

from __future__ import annotations

import json

import pytest

from lora.adapter import LoraAdapter
from server.cli.launch import mosaic_cli
from tests.helpers import DEMO, dense_delta, drop_prefix, mosaic_env, random_adapter, run_cli

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"


@pytest.fixture
def env(base_model_dir, base_spec, redis_client, tmp_path):
    e = mosaic_env(base_model_dir, base_spec.model_id, tmp_path / "data")
    yield e
    drop_prefix(redis_client, e["MOSAIC_REDIS_PREFIX"])


def _dir(tmp_path, base_spec, name, r, seed, shapes=(Q, V)):
    a = random_adapter({m: base_spec.shapes[m] for m in shapes}, r=r, seed=seed, base_model=base_spec.model_id)
    return a.save_dir(tmp_path / name), a


def test_add_list_show_compose_export_rm(env, tmp_path, base_spec):
    d1, a1 = _dir(tmp_path, base_spec, "one", 4, 1)
    d2, a2 = _dir(tmp_path, base_spec, "two", 2, 2, shapes=(Q,))
    r = run_cli(env, "skills", "add", str(d1), "--name", "one", "--description", "first", "--example", "e1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == a1.sha256()
    assert run_cli(env, "skills", "add", str(d2), "--name", "two").returncode == 0
    again = run_cli(env, "skills", "add", str(d2), "--name", "two", "--if-changed")
    assert again.returncode == 0 and "unchanged" in again.stdout
    listed = json.loads(run_cli(env, "skills", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["one", "two"] and listed[0]["examples"] == ["e1"]
    shown = json.loads(run_cli(env, "skills", "show", "one", "--json").stdout)
    assert shown["versions"] == [1] and shown["description"] == "first"
    r = run_cli(env, "compose", "--skills", "one,two", "--weights", "0.5,-1", "--method", "linear", "--name", "mix", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rank"] == 6
    # the quality report: "one" has an example prompt (answered by the reference engine), "two" has none
    quality = json.loads(r.stdout)["composition"]["quality"]
    assert [(q["skill"], q["prompts"]) for q in quality["skills"]] == [("one@1", 1), ("two@1", 0)]
    assert quality["skills"][0]["agreement"] in (0.0, 1.0) and quality["skills"][1]["agreement"] is None
    assert "quality" in run_cli(env, "skills", "show", "mix").stdout
    # min_agreement needs examples for every input: refused, nothing stored
    r = run_cli(env, "compose", "--skills", "one,two", "--name", "mix2", "--min-agreement", "0.5")
    assert r.returncode == 1 and "two@1 has none" in r.stderr
    r = run_cli(env, "compose", "--skills", "one,two", "--weights", "auto", "--name", "virtual", "--quality-prompts", "0",
                   "--json")
    assert r.returncode == 0, r.stderr
    virtual = json.loads(r.stdout)["composition"]
    assert virtual["weights"] == "auto" and virtual["skills"] == ["one@1", "two@1"] and "quality" not in virtual
    out = tmp_path / "mix-export"
    assert run_cli(env, "skills", "export", "mix", str(out)).returncode == 0
    mix = dense_delta(LoraAdapter.from_dir(out))
    d1d, d2d = dense_delta(a1), dense_delta(a2)
    import torch

    torch.testing.assert_close(mix[Q], 0.5 * d1d[Q] - d2d[Q], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mix[V], 0.5 * d1d[V], rtol=1e-5, atol=1e-7)
    r = run_cli(env, "compose", "--skills", "one,two", "--method", "svd", "--rank", "2", "--out", str(tmp_path / "svd"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rank"] == 2
    assert run_cli(env, "skills", "rm", "one").returncode == 0
    assert [s["name"] for s in json.loads(run_cli(env, "skills", "list", "--json").stdout)] == ["mix", "two", "virtual"]
    page = run_cli(env, "skills", "list", "--json", "--limit", "1", "--after", "mix")
    assert [s["name"] for s in json.loads(page.stdout)] == ["two"]
    assert run_cli(env, "skills", "list", "--limit", "0").returncode == 2


def test_wrong_arguments_fail_clearly(env, tmp_path, base_spec):
    r = mosaic_cli(env, "compose", "--method", "linear", "--out", str(tmp_path / "x"))  # as its own process
    assert r.returncode == 2 and "--skills is required" in r.stderr
    r = run_cli(env, "compose", "--skills", "a", "--name", "x", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "exactly one of" in r.stderr
    r = run_cli(env, "compose", "--skills", "a,b", "--weights", "1", "--name", "x")
    assert r.returncode == 2 and "2 skills but 1 weights" in r.stderr
    r = run_cli(env, "compose", "--skills", "a", "--method", "nope", "--name", "x")
    assert r.returncode == 2 and "unknown method" in r.stderr
    r = run_cli(env, "compose", "--skills", "a,b", "--weights", "auto", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "store it with --name" in r.stderr
    r = run_cli(env, "compose", "--skills", "a,b", "--weights", "one,two", "--name", "x")
    assert r.returncode == 2 and "comma-separated numbers or 'auto'" in r.stderr
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "x", "--min-agreement", "2")
    assert r.returncode == 2
    r = run_cli(env, "skills", "add", str(tmp_path / "missing"), "--name", "x")
    assert r.returncode == 1 and "does not exist" in r.stderr
    d, _ = _dir(tmp_path, base_spec, "big", 8, 1)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 1, "target_modules": ["q_proj"]}))
    r = run_cli(env, "skills", "add", str(d), "--name", "bad name")
    assert r.returncode == 1 and "not allowed" in r.stderr and "differs from the config's rank 3" in r.stderr
    assert json.loads(run_cli(env, "skills", "list", "--json").stdout) == []
    r = run_cli(env, "skills", "add", str(DEMO / "sentiment"), "--name", "x", *["--example", "e"] * 65)  # as over HTTP
    assert r.returncode == 1 and "MOSAIC_MAX_EXAMPLES_PER_SKILL" in r.stderr
    r = run_cli({**env, "MOSAIC_MAX_TENSORS": "4"}, "skills", "add", str(DEMO / "sentiment"), "--name", "x")
    assert r.returncode == 1 and "MOSAIC_MAX_TENSORS" in r.stderr
    assert json.loads(run_cli(env, "skills", "list", "--json").stdout) == []
    r = run_cli(env, "skills", "show", "ghost")
    assert r.returncode == 1 and "does not exist" in r.stderr
    methods = json.loads(run_cli(env, "compose", "--list-methods", "--json").stdout)
    assert {"linear", "svd"} <= {m["name"] for m in methods}
    r = run_cli(env, "serve", "--replicas", "3")  # counts the replicas of --ray: refused, not ignored
    assert r.returncode == 2 and "without --ray" in r.stderr


def test_skills_compress_show_and_off(env):

    for name in ("sentiment", "uppercase", "km_to_m"):
        assert run_cli(env, "skills", "add", str(DEMO / name), "--name", name).returncode == 0
    r = run_cli(env, "skills", "compress", "--pool-size", "64", "--error-budget", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ratio"] >= 4 and {v["stored"] for v in report["versions"]} == {"shards"}
    shown = json.loads(run_cli(env, "skills", "show", "sentiment", "--json").stdout)
    assert 0 < shown["mos"]["error"] <= 0.5 and shown["mos"]["bytes"] * 4 < shown["size"]
    text = run_cli(env, "skills", "show", "sentiment").stdout
    assert "MoS shards (pools v1)" in text and "relative error" in text
    human = run_cli(env, "skills", "compress", "--pool-size", "64", "--error-budget", "0.5")
    assert human.returncode == 0 and "smaller" in human.stdout and "pools v2" in human.stdout
    # wrong arguments: refused before anything changes
    for bad in (["--error-budget", "2"], ["--error-budget", "0"], ["--pool-size", "1"], ["--shard-width", "0"],
                ["--shard-width", "5000"], ["--max-private", "-1"]):
        r = run_cli(env, "skills", "compress", *bad)
        assert r.returncode == 2 and "Invalid value" in r.stderr, (bad, r.stderr)
    assert json.loads(run_cli(env, "skills", "show", "sentiment", "--json").stdout)["mos"]["pool_version"] == 2
    off = run_cli(env, "skills", "compress", "--off")
    assert off.returncode == 0 and "3 versions changed" in off.stdout
    shown = json.loads(run_cli(env, "skills", "show", "sentiment", "--json").stdout)
    assert shown["mos"]["pool_version"] is None and shown["mos"]["error"] > 0  # the decoded shards, stored exact


def test_compose_optimize_learns_and_stores_the_trace(env, tmp_path, base_spec):
    d1, _ = _dir(tmp_path, base_spec, "one", 4, 1)
    d2, _ = _dir(tmp_path, base_spec, "two", 2, 2, shapes=(Q,))
    assert run_cli(env, "skills", "add", str(d1), "--name", "one").returncode == 0
    assert run_cli(env, "skills", "add", str(d2), "--name", "two").returncode == 0
    data = tmp_path / "examples.jsonl"
    data.write_text('{"prompt": "Say hi", "answer": "hi"}\n{"prompt": "Say yes", "answer": "yes"}\n')
    r = run_cli(env, "compose", "--skills", "one,two", "--name", "learned", "--optimize-examples", str(data),
                   "--budget", "3", "--quality-prompts", "0", "--json")
    assert r.returncode == 0, r.stderr
    comp = json.loads(r.stdout)["composition"]
    assert len(comp["optimize"]["trace"]) == 3 and comp["optimize"]["examples"] == 2
    assert comp["weights"] == comp["optimize"]["best"]["weights"] and comp["optimize"]["options"]["budget"] == 3
    assert comp["optimize"]["best"]["objective"] == min(t["objective"] for t in comp["optimize"]["trace"])
    # wrong uses: a folder, context-aware weights, a broken examples file; nothing stored
    r = run_cli(env, "compose", "--skills", "one,two", "--optimize", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--optimize learns fixed weights" in r.stderr
    r = run_cli(env, "compose", "--skills", "one,two", "--optimize", "--weights", "auto", "--name", "x")
    assert r.returncode == 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": ""}\n')
    r = run_cli(env, "compose", "--skills", "one,two", "--name", "x", "--optimize-examples", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "bad --optimize-examples" in r.stderr
    # no examples given and none registered: a clear error
    r = run_cli(env, "compose", "--skills", "one,two", "--name", "x", "--optimize", "--budget", "2")
    assert r.returncode == 1 and "no example prompts" in r.stderr
    assert [s["name"] for s in json.loads(run_cli(env, "skills", "list", "--json").stdout)] == ["learned", "one", "two"]
