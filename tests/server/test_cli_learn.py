"""``mosaic compose --learn``: wrong arguments exit 2 with a clear message and store nothing; the examples file is
read line by line (prompt/answer pairs or chats) and its bad lines are named; a real run (the reference base model,
two small skills, one step per stage) stores the expansion with its parents, fusion weights and report."""

from __future__ import annotations

import json
import re

import pytest
import torch

from adapter_store.registry import Registry
from composer.fusion import FusionWeights, fuse
from server.cli import learn as learning
from server.jobs.learn_composition import LearnExample
from tests.helpers import random_adapter, run_cli
from tests.server.test_cli import env  # noqa: F401 (the fixture)

Q = "model.layers.0.self_attn.q_proj"
EXAMPLES = [{"prompt": f"Say {w}.", "answer": w} for w in ("hi", "yes", "no", "ok")]


@pytest.fixture
def library(env, redis_client, base_spec):  # noqa: F811 (the fixture)
    """Two one-module random skills, ``a`` and ``b``, in the CLI's registry."""
    reg = Registry(redis_client, prefix=env["MOSAIC_REDIS_PREFIX"])
    for i, name in enumerate(("a", "b")):
        reg.add(name, random_adapter({Q: base_spec.shapes[Q]}, r=2, seed=i, base_model=base_spec.model_id),
                examples=[f"say {name}"])
    return reg


def _jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("args, words", [
    (["--optimize"], "give one of the two"),
    (["--optimize-examples", "{examples}"], "give one of the two"),
    (["--weights", "auto"], "'auto'"),
    (["--method", "ties"], "method, params, rank"),
    (["--rank", "2"], "method, params, rank"),
    (["--quality-prompts", "4"], "learn.min_validation"),
    (["--min-agreement", "0.5"], "learn.min_validation"),
    (["--expand-steps", "2"], "give --expand-rank too"),
    (["--granularity", "row"], "'row' is not one of"),
    (["--steps", "5000"], "--steps: Input should be less than or equal to 2000"),
    (["--expand-rank", "1000"], "--expand-rank: Input should be less than or equal to 64"),
    (["--min-validation", "--no-baselines"], "min_validation compares with each input skill alone"),
])
def test_wrong_combinations_exit_2_and_store_nothing(env, library, tmp_path, args, words):  # noqa: F811
    examples = _jsonl(tmp_path / "ex.jsonl", EXAMPLES)
    argv = [a.format(examples=examples) for a in args]
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "learned", "--learn", examples, *argv)
    assert r.returncode == 2 and words in " ".join(r.stderr.split()), r.stderr
    assert [i.name for i in library.list()] == ["a", "b"]


def test_learn_with_out_or_tuning_without_learn_exit_2(env, library, tmp_path):  # noqa: F811
    examples = _jsonl(tmp_path / "ex.jsonl", EXAMPLES)
    r = run_cli(env, "compose", "--skills", "a,b", "--out", str(tmp_path / "dir"), "--learn", examples)
    assert r.returncode == 2 and "use --name, not --out" in r.stderr and not (tmp_path / "dir").exists()
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "mix", "--expand-rank", "8", "--steps", "3")
    assert r.returncode == 2 and "--steps, --expand-rank tune learning" in r.stderr, r.stderr
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "x", "--learn", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "bad name!", "--learn", examples)
    assert r.returncode == 2 and "is not allowed" in r.stderr
    assert [i.name for i in library.list()] == ["a", "b"]


def test_too_few_examples_and_unknown_skills_are_refused_before_learning(env, library, tmp_path):  # noqa: F811
    one = _jsonl(tmp_path / "one.jsonl", EXAMPLES[:1])
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "x", "--learn", one)
    assert r.returncode == 2 and "at least 2 examples" in r.stderr, r.stderr
    examples = _jsonl(tmp_path / "ex.jsonl", EXAMPLES)
    r = run_cli(env, "compose", "--skills", "a,ghost", "--name", "x", "--learn", examples)
    assert r.returncode == 1 and "ghost" in r.stderr, r.stderr
    assert [i.name for i in library.list()] == ["a", "b"]


def test_bad_lines_are_named_and_nothing_is_stored(env, library, tmp_path):  # noqa: F811
    path = _jsonl(tmp_path / "bad.jsonl", [
        EXAMPLES[0],
        "{not json",
        {"prompt": "no answer"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        "",
        {"prompt": "p", "answer": ""},
        ["a", "list"],
        EXAMPLES[1],
    ])
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "x", "--learn", path)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "bad --learn examples: bad.jsonl" in said, r.stderr
    named = [int(n) for n in re.findall(r"line (\d+):", said)]
    assert named == [2, 3, 4, 6, 7], said
    assert "answer: Field required" in said and "2 messages before the answer" in said
    assert [i.name for i in library.list()] == ["a", "b"]


def test_the_examples_file_reads_pairs_and_one_turn_chats(tmp_path):
    path = tmp_path / "ex.jsonl"
    _jsonl(path, [
        {"prompt": "Say hi.", "answer": "hi"},
        {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]},
        "   ",
        {"prompt": "Say no.", "completion": "no"},
    ])
    assert learning.read_examples(path) == [LearnExample(prompt=p, answer=a) for p, a in
                                            (("Say hi.", "hi"), ("Say yes.", "yes"), ("Say no.", "no"))]


@pytest.mark.slow  # every stage on the real base model: about a minute on 2 cores
def test_a_real_run_stores_the_expansion_with_its_report(env, library, tmp_path):  # noqa: F811
    examples = _jsonl(tmp_path / "ex.jsonl", EXAMPLES)
    r = run_cli(env, "compose", "--skills", "a,b", "--name", "learned", "--learn", examples, "--steps", "1",
                "--expand-rank", "2", "--expand-steps", "1", "--json")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    info = library.info("learned")
    assert printed == json.loads(json.dumps(info.model_dump(), default=str))  # what is printed is what is stored
    rec = info.composition
    assert info.origin == "expansion" and "learned" in info.tags and info.examples == [e["prompt"] for e in EXAMPLES]
    assert rec["skills"] == ["a@1", "b@1"] and rec["method"] == "fusion" and rec["granularity"] == "layer"
    assert rec["expansion"]["rank"] == 2 and rec["expansion"]["steps"] == 1 and rec["learn"]["examples"] == 4
    assert rec["learn"]["options"]["steps"] == 1 and rec["learn"]["options"]["baselines"] is True
    report = rec["learn"]["report"]
    assert [row["kind"] for row in report["rows"]] == ["alone", "alone", "fixed", "context", "learned", "learned",
                                                      "expanded", "scratch"]
    assert report["stored"] == "expanded (rank 2, residual)" and report["train_examples"] + report["val_examples"] == 4
    assert all(0.0 <= row["val_exact_match"] <= 1.0 and row["val_loss"] > 0 for row in report["rows"])
    # what is stored: the fusion the record names, plus a difference of rank ≤ 2 on the one module
    parents = [library.load(ref)[1] for ref in rec["skills"]]
    fused = fuse(parents, FusionWeights.model_validate(rec["fusion"])).modules()[Q]
    stored = library.load("learned")[1].modules()[Q]
    diff = stored.scaling * stored.B.double() @ stored.A.double() - fused.scaling * fused.B.double() @ fused.A.double()
    assert torch.linalg.matrix_rank(diff, atol=1e-5) <= 2
    # the table printed without --json: one line per row, the stored one marked
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(learning.report_table(info))
    lines = console.export_text().splitlines()
    for row in report["rows"]:
        assert sum(row["name"] in line for line in lines) == 1, row["name"]
    assert [line for line in lines if "→" in line] == [next(line for line in lines if report["stored"] in line)]
