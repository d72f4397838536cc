"""Learned composition weights (LoraHub) as background jobs of the server.

``POST /v1/compositions`` with ``"optimize"`` answers 202 with a job; ``GET /v1/compositions/jobs/{id}``
tells how it goes (evaluations done, best objective and weights so far); ``DELETE`` cancels it between
two evaluations. When the search ends the composition is stored with the best weights, its quality
report and the search trace. One search (or learn job, server/jobs/learn_api.py) runs at a time per
namespace across every replica (409 otherwise; keys without a namespace share one); searches of different
namespaces take turns on the server's reference model, one evaluation at a time. What one search may cost
is checked before it starts (learned_weights.check_job). The jobs live on the job board in Redis
(server/jobs/board.py): any replica lists, shows and cancels them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from adapter_store.skill_info import SkillInfo
from adapter_store.validation import in_namespace
from composer import CompositionCancelled
from composer.spec import Composition
from lora.errors import MosaicError, NotFoundError
from server.core.state import Service
from server.edge import auth
from server.edge.auth import require_scope
from server.jobs.board import Board, board
from server.jobs.learned_weights import (
    OptimizeOptions,
    Trial,
    base_tokenizer,
    check_job,
    optimize_composition,
    optimize_record,
    reference_model,
)
from server.jobs.library import create_and_store
from server.jobs.quality import engine_answerer

log = logging.getLogger("mosaic.optimize")
router = APIRouter(tags=["skills"])
admin = [Depends(require_scope("admin"))]


class OptimizeJob(BaseModel):
    id: str
    kind: Literal["optimize", "learn"] = Field(default="optimize", description="a weight search (optimize) or a "
                                               "learned fusion (learn)")
    state: Literal["running", "done", "failed", "cancelled"] = "running"
    name: str = Field(description="the skill the result is stored as")
    skills: list[str]
    started: float
    finished: float | None = None
    progress: dict = Field(default_factory=dict, description="evaluations done of the budget, best objective and weights")
    result: SkillInfo | None = None
    error: str | None = None
    # whose slot it holds: the caller key's namespace (None: keys without one); not sent
    namespace: str | None = Field(default=None, exclude=True)


KIND = "composition"  # the board's kind for weight searches and learn jobs


FULL = ("{n} weight searches are running, the most this server runs at once (setting MOSAIC_MAX_SEARCHES): "
        "wait for one to end")


def _search_threads(request: Request, most: int) -> ThreadPoolExecutor:
    """The searches' own threads: a long search never takes one of the threads that requests' work waits on."""
    state = request.app.state
    if not hasattr(state, "search_threads"):
        state.search_threads = ThreadPoolExecutor(max_workers=most, thread_name_prefix="mosaic-search")
    return state.search_threads


async def start(request: Request, service: Service, comp: Composition, options: OptimizeOptions, *, name: str,
                description: str, examples: list[str], quality_prompts: int, min_agreement: float | None) -> OptimizeJob:
    """Check the search (its skills exist, each evaluation's composition is within the compose budget, its
    examples within their limits), then start it: the namespace's slot is claimed after the last await, so two
    requests cannot both run one."""
    namespace, most = auth.namespace(request), service.settings.max_searches
    infos = [await service.cache.resolve(ref) for ref in comp.skills]  # a missing skill is a 404 now, not a failed job later
    service.cache.composer.check(comp, infos)  # each evaluation composes it
    tokenizer = await asyncio.to_thread(base_tokenizer, service.model_dir)
    await asyncio.to_thread(check_job, options, infos, service.settings, tokenizer)
    job, stop = claim(request, OptimizeJob(id=uuid.uuid4().hex[:16], name=name, skills=list(comp.skills),
                                           started=time.time(), progress={"done": 0, "budget": options.budget},
                                           namespace=namespace))
    store = partial(  # the learned composition, stored as the request asked
        create_and_store, service.registry, service.base_spec, name=name, description=description, examples=examples,
        max_rank=service.settings.max_adapter_rank, answer=engine_answerer(service),
        weigh=lambda c: (lambda text: service.route_within(text, c)), engine=service.settings.engine,
        quality_prompts=quality_prompts, min_agreement=min_agreement, composer=service.cache.composer,
        text=service.settings.text_limits())
    threads = _search_threads(request, most)
    service.tasks.append(asyncio.get_running_loop().create_task(
        _run(service, job, comp, options, stop, store, threads, board(request.app.state))))
    return job


def claim(request: Request, job: OptimizeJob) -> tuple[OptimizeJob, threading.Event]:
    """Put a new job on the board (call after the last await): its namespace's slot taken across every replica
    (409 while another search or learn job of the namespace runs), then a place among the MOSAIC_MAX_SEARCHES
    jobs this server runs at once (each holds one of the searches' own threads for up to an hour); returns it
    with its stop event."""
    whose = f"namespace {job.namespace!r}" if job.namespace is not None else "keys without a namespace"
    stop = board(request.app.state).start(
        job, KIND, namespace=job.namespace, slot=f"compositions:{job.namespace or ''}",
        busy=f"a weight search or learn job is already running for {whose}: wait for it or cancel it",
        most=request.app.state.mosaic.settings.max_searches, full=FULL)
    return job, stop


async def _run(service: Service, job: OptimizeJob, comp: Composition, options: OptimizeOptions, stop: threading.Event,
               store: Callable[..., Awaitable[SkillInfo]], threads: ThreadPoolExecutor, jobs: Board) -> None:
    """The search in a worker thread (each candidate composed on the server's compose threads), then
    ``store(learned, extra=...)``; DELETE sets ``stop``."""
    def progress(done: int, trial: Trial, best: Trial) -> None:
        job.progress = {"done": done, "budget": options.budget, "last": trial.model_dump(), "best": best.model_dump()}

    def pick_for(template: Composition):
        skills = service.skills()
        return lambda prompt: int(np.argmax(service.policy.route_within(prompt, template, skills, 0).alpha))

    try:
        model = await asyncio.to_thread(reference_model, service)
        learned, result = await asyncio.get_running_loop().run_in_executor(threads, partial(
            optimize_composition, service.registry, comp, options, model, pick_for,
            max_rank=service.settings.max_adapter_rank, progress=progress, stop=stop, composer=service.cache.composer))
        if result.cancelled:
            job.state = "cancelled"
            return
        job.result = await store(learned, extra={"optimize": optimize_record(options, result)})
        job.state = "done"
    except CompositionCancelled:  # cancelled while a candidate was being composed
        job.state = "cancelled"
    except MosaicError as exc:
        job.state, job.error = "failed", exc.message
    except Exception as exc:  # reported to whoever polls (and logged); nothing is stored before the search ends
        log.exception("weight search %s failed", job.id)
        job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        job.finished = time.time()
        await asyncio.to_thread(jobs.finish, job)


@router.get("/v1/compositions/jobs", response_model=list[OptimizeJob], dependencies=admin)
async def list_jobs(request: Request) -> list[OptimizeJob]:
    """Every replica's weight searches and learn jobs (the newest, oldest first) the caller's key may see."""
    ns = auth.namespace(request)
    listed = await asyncio.to_thread(board(request.app.state).list, OptimizeJob, KIND)
    return [j for j, _ in listed if ns is None or in_namespace(j.name, ns)]


@router.get("/v1/compositions/jobs/{job_id}", response_model=OptimizeJob, dependencies=admin)
async def get_job(job_id: str, request: Request) -> OptimizeJob:
    found = await asyncio.to_thread(board(request.app.state).get, job_id, OptimizeJob, KIND)
    ns = auth.namespace(request)
    if found is None or (ns is not None and not in_namespace(found[0].name, ns)):
        raise NotFoundError(f"no weight search or learn job {job_id!r}", param="job_id")
    return found[0]


@router.delete("/v1/compositions/jobs/{job_id}", response_model=OptimizeJob, dependencies=admin)
async def cancel_job(job_id: str, request: Request) -> OptimizeJob:
    """Cancel a running search or learn job, on whichever replica runs it (it stops after the evaluation or
    step in progress; nothing is stored)."""
    job = await get_job(job_id, request)
    if job.state == "running":
        await asyncio.to_thread(board(request.app.state).cancel, job_id)
    return job
