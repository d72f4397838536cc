"""The job board (server/jobs/board.py) as two replicas see it: one Redis, two boards. A job started on one is
listed and shown by the other, a cancel sent to the other stops it, a namespace's slot holds across both, and a
job whose server stopped is reported failed. Real Redis."""

from __future__ import annotations

import time

import pytest

from lora.errors import ConflictError
from server.jobs import board as board_module
from server.jobs.board import Board
from server.jobs.optimize_api import OptimizeJob


def _job(job_id: str, name: str = "x") -> OptimizeJob:
    return OptimizeJob(id=job_id, name=name, skills=["a", "b"], started=time.time(), progress={"done": 0})


def _until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def replicas(registry):
    one, two = Board(registry, beat=0.1), Board(registry, beat=0.1)
    yield one, two
    one.close()
    two.close()


def test_a_job_started_on_one_replica_is_seen_and_cancelled_on_the_other(replicas):
    one, two = replicas
    job = _job("j1")
    stop = one.start(job, "composition", namespace="a", slot="compositions:a")
    seen, ns = two.get("j1", OptimizeJob, "composition")
    assert seen.state == "running" and seen.name == "x" and ns == "a"
    job.progress = {"done": 3}  # the owner's progress reaches the other replica within a heartbeat
    assert _until(lambda: two.get("j1", OptimizeJob, "composition")[0].progress == {"done": 3})
    assert [j.id for j, _ in two.list(OptimizeJob, "composition")] == ["j1"]
    assert two.get("j1", OptimizeJob, "compress") is None  # another kind's id is not this kind's job
    two.cancel("j1")
    assert stop.wait(5), "the owner's stop event was not set from the other replica"
    job.state, job.finished = "cancelled", time.time()
    one.finish(job)
    assert two.get("j1", OptimizeJob, "composition")[0].state == "cancelled"


def test_a_namespace_slot_holds_across_replicas_and_is_let_go_of(replicas):
    one, two = replicas
    first = _job("j2")
    one.start(first, "composition", namespace="a", slot="compositions:a")
    with pytest.raises(ConflictError, match="already running.*j2"):
        two.start(_job("j3"), "composition", namespace="a", slot="compositions:a", busy="already running")
    two.start(_job("j4"), "composition", namespace="b", slot="compositions:b")  # another namespace: its own slot
    first.state = "done"
    one.finish(first)
    two.start(_job("j5"), "composition", namespace="a", slot="compositions:a")  # free again


def test_this_servers_cap_counts_its_own_jobs_only(replicas):
    one, two = replicas
    one.start(_job("j6"), "composition", most=1, full="{n} running")
    with pytest.raises(ConflictError, match="1 running"):
        one.start(_job("j7"), "composition", most=1, full="{n} running")
    assert one.get("j7", OptimizeJob, "composition") is None  # refused: nothing published
    two.start(_job("j8"), "composition", most=1, full="{n} running")


def test_a_job_whose_server_stopped_is_reported_failed(replicas, monkeypatch):
    one, two = replicas
    one.start(_job("j9"), "composition", slot="compositions:")
    one.close()  # the owner stops beating (its process died)
    monkeypatch.setattr(board_module, "DEAD_AFTER", 0.5)
    assert _until(lambda: two.get("j9", OptimizeJob, "composition")[0].state == "failed")
    assert "stopped" in two.get("j9", OptimizeJob, "composition")[0].error
