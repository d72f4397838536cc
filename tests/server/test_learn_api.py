"""``POST /v1/compositions`` with ``"learn"``: bad requests are 400s naming the field before any job starts, a
cancelled job stores nothing, and a real job (the reference base model, two small skills) runs every stage and
stores the expansion with its parent skills, fusion weights and report. The engine stays down: learning uses
the reference model only."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from composer.fusion import FusionWeights, fuse
from server.jobs import learn_api
from server.jobs.learn_composition import LearnCancelled
from tests.server.test_compose_budget import Q, _add, _names, app_factory  # noqa: F401 (the fixture)

EXAMPLES = [{"prompt": f"Say {w}.", "answer": w} for w in ("hi", "yes", "no", "ok")]
BASE = {"name": "learned", "skills": ["a", "b"]}


def _post(client, learn: dict | None = None, **fields):
    return client.post("/v1/compositions", json={**BASE, **fields, "learn": learn})


def _wait(client, job_id: str, seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds
    while (job := client.get(f"/v1/compositions/jobs/{job_id}").json())["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


@pytest.mark.parametrize("fields, learn, param, words", [
    ({}, {}, "learn.examples", "at least 2 examples"),
    ({}, {"examples": EXAMPLES[:1]}, "learn.examples", "at least 2 examples"),
    ({}, {"examples": [{"prompt": "p"}, {"prompt": "q"}]}, "learn.examples.0.answer", "Field required"),
    ({}, {"examples": [{"prompt": "x" * 2_000_000, "answer": "y"}, EXAMPLES[0]]}, "learn.examples[0]",
     "MOSAIC_MAX_PROMPT_CHARS"),
    ({}, {"examples": [{"prompt": "p", "answer": "a"}] * 257}, "learn.examples", "MOSAIC_MAX_EXAMPLES"),
    ({}, {"examples": EXAMPLES, "granularity": "row"}, "learn.granularity", "'skill', 'layer' or 'module'"),
    ({}, {"examples": EXAMPLES, "steps": 5000}, "learn.steps", "less than or equal to 2000"),
    ({}, {"examples": EXAMPLES, "expand": {"rank": 1000}}, "learn.expand.rank", "less than or equal to 64"),
    ({}, {"examples": EXAMPLES, "expand": {"rnak": 8}}, "learn.expand.rnak", "Extra inputs"),
    ({}, {"examples": [{"prompt": "a short prompt " * 20, "answer": "y"}] * 200, "steps": 2000}, "learn.steps",
     "MOSAIC_MAX_JOB_TOKENS"),
    ({}, {"examples": EXAMPLES, "min_validation": True, "baselines": False}, "learn", "min_validation"),
    ({"method": "lego"}, {"examples": EXAMPLES}, "learn", "method, params, rank"),
    ({"weights": "auto"}, {"examples": EXAMPLES}, "learn", "'auto'"),
    ({"quality_prompts": 4}, {"examples": EXAMPLES}, "learn", "learn.min_validation"),
    ({"optimize": {"budget": 2}}, {"examples": EXAMPLES}, "learn", "one of the two"),
])
def test_bad_learn_requests_are_400_naming_the_field(app_factory, fields, learn, param, words):
    client, _ = app_factory()
    with client:
        _add(client, ["a", "b"])
        r = _post(client, learn, **fields)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
        assert client.get("/v1/compositions/jobs").json() == []
        assert _names(client) == ["a", "b"]


def test_rank_and_scoring_bounds_are_checked_before_the_job(app_factory):
    """A fusion concatenates: the skills' ranks plus the expansion's over the rank served exactly is a 400 before
    any work; the report's scoring counts against MOSAIC_MAX_JOB_TOKENS too (here a held-out share of 0.9)."""
    client, _ = app_factory(max_lora_rank=8)
    with client:
        _add(client, ["a", "b"], r=4)
        r = _post(client, {"examples": EXAMPLES, "expand": {"rank": 2}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learn.expand.rank", r.text
        assert "rank 10" in r.json()["error"]["message"] and "MOSAIC_MAX_LORA_RANK" in r.json()["error"]["message"]
        assert client.get("/v1/compositions/jobs").json() == []
    client, _ = app_factory(max_job_tokens=4000)
    with client:
        _add(client, ["a", "b"])
        many = [{"prompt": f"Say {i}.", "answer": "ok"} for i in range(40)]
        r = _post(client, {"examples": many, "steps": 1, "validation": 0.9, "expand": {"steps": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "learn.validation", r.text
        assert "report rows" in r.json()["error"]["message"]


def test_unknown_skill_is_404_and_nothing_starts(app_factory):
    client, _ = app_factory()
    with client:
        _add(client, ["a"])
        r = _post(client, {"examples": EXAMPLES})
        assert r.status_code == 404 and r.json()["error"]["param"] in ("skills", "model"), r.text
        assert client.get("/v1/compositions/jobs").json() == []


def test_a_cancelled_job_stores_nothing(app_factory, monkeypatch):
    started, seen_stop = threading.Event(), []

    def held(lm, adapters, skills, options, *, stop, progress, **kw):  # learning until told to stop
        progress("learn", 1, 60, 1.0, 1.0)
        started.set()
        while not stop.wait(0.01):
            pass
        seen_stop.append(True)
        raise LearnCancelled()

    monkeypatch.setattr(learn_api, "learn_composition", held)
    client, _ = app_factory()
    with client:
        client.app.state.mosaic.reference = object()  # the job above needs no model: none is loaded
        _add(client, ["a", "b"])
        r = _post(client, {"examples": EXAMPLES})
        assert r.status_code == 202 and r.json()["kind"] == "learn", r.text
        assert started.wait(30)
        job = client.get(f"/v1/compositions/jobs/{r.json()['id']}").json()
        assert job["state"] == "running" and job["progress"]["stage"] == "learn" and job["progress"]["step"] == 1
        clash = _post(client, {"examples": EXAMPLES})  # one job per namespace, shared with weight searches
        assert clash.status_code == 409, clash.text
        assert client.delete(f"/v1/compositions/jobs/{r.json()['id']}").status_code == 200
        assert _wait(client, r.json()["id"], 30)["state"] == "cancelled" and seen_stop
        assert _names(client) == ["a", "b"]


@pytest.mark.slow  # every stage on the real base model: about 30 s here
def test_a_real_job_runs_every_stage_and_stores_the_expansion(app_factory):
    """The reference model, two one-module skills, one step per stage: the stored skill is the learned fusion
    plus a rank-2 residual, its record naming the parents at their versions, the fusion and the report."""
    client, _ = app_factory()
    with client:
        _add(client, ["a", "b"], r=2)
        learn = {"examples": EXAMPLES, "steps": 1, "validation": 0.25, "expand": {"rank": 2, "steps": 1}}
        r = _post(client, learn, examples=["Say something."])
        assert r.status_code == 202, r.text
        job = _wait(client, r.json()["id"])
        assert job["state"] == "done", job
        assert job["progress"]["stages"] == ["baselines", "learn per skill", "learn", "expand", "scratch"]
        assert set(job["progress"]["curves"]) == {"learn per skill", "learn", "expand", "scratch"}
        info = client.get("/v1/adapters/learned").json()
        rec = info["composition"]
        assert info["origin"] == "expansion" and info["examples"] == ["Say something."] and "learned" in info["tags"]
        assert rec["skills"] == ["a@1", "b@1"] and rec["method"] == "fusion" and rec["granularity"] == "layer"
        assert rec["expansion"]["parent"]["skills"] == ["a@1", "b@1"] and rec["expansion"]["rank"] == 2
        report = rec["learn"]["report"]
        assert [row["kind"] for row in report["rows"]] == ["alone", "alone", "fixed", "context", "learned", "learned",
                                                          "expanded", "scratch"]
        assert report["stored"] == "expanded (rank 2, residual)" and report["val_examples"] == 1
        # what is stored: the fusion the record names, plus a difference of rank ≤ 2 on the one module
        registry = client.app.state.mosaic.registry
        parents = [registry.load(ref)[1] for ref in rec["skills"]]
        fused = fuse(parents, FusionWeights.model_validate(rec["fusion"])).modules()[Q]
        stored = registry.load("learned")[1].modules()[Q]
        R = fused.rank
        assert stored.rank == R + 2 and stored.scaling == fused.scaling == 1.0
        assert torch.equal(stored.A[:R], fused.A) and torch.equal(stored.B[:, :R], fused.B)  # the fusion, exactly
        assert torch.linalg.matrix_rank(stored.B[:, R:].double() @ stored.A[R:].double(), atol=1e-6) <= 2
