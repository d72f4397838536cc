"""Learned composition weights (LoraHub) as background jobs of the server.

``POST /v1/compositions`` with ``"optimize"`` answers 202 with a job; ``GET /v1/compositions/jobs/{id}``
tells how it goes (evaluations done, best objective and weights so far); ``DELETE`` cancels it between
two evaluations. When the search ends the composition is stored with the best weights, its quality
report and the search trace. One search runs at a time per namespace (409 otherwise; keys without a
namespace share one); searches of different namespaces take turns on the server's reference model,
one evaluation at a time. What one search may cost is checked before it starts (learned_weights.check_job).
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
from lora.errors import ConflictError, MosaicError, NotFoundError
from server.core.state import Service
from server.edge import auth
from server.edge.auth import require_scope
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


KEEP_JOBS = 100  # finished jobs kept for GET /v1/compositions/jobs


def _jobs(request: Request) -> dict[str, OptimizeJob]:
    state = request.app.state
    if not hasattr(state, "optimize_jobs"):
        state.optimize_jobs, state.optimize_cancel = {}, {}
    return state.optimize_jobs


def _check_slot(jobs: dict[str, OptimizeJob], namespace: str | None, most: int) -> None:
    """One search at a time per namespace (keys without one, the root's included, share theirs), and at most
    ``most`` in all (MOSAIC_MAX_SEARCHES: each holds one of the searches' own threads for up to an hour)."""
    running = [j for j in jobs.values() if j.state == "running"]
    if any(j.namespace == namespace for j in running):
        whose = f"namespace {namespace!r}" if namespace is not None else "keys without a namespace"
        raise ConflictError(f"a weight search is already running for {whose}: wait for it or cancel it")
    if len(running) >= most:
        raise ConflictError(f"{len(running)} weight searches are running, the most this server runs at once "
                            "(setting MOSAIC_MAX_SEARCHES): wait for one to end")


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
    jobs, namespace, most = _jobs(request), auth.namespace(request), service.settings.max_searches
    _check_slot(jobs, namespace, most)
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
    service.tasks.append(asyncio.get_running_loop().create_task(_run(service, job, comp, options, stop, store, threads)))
    return job


def claim(request: Request, job: OptimizeJob) -> tuple[OptimizeJob, threading.Event]:
    """Register a new job (its namespace's slot checked again: call after the last await) and its cancel event;
    finished jobs beyond the last KEEP_JOBS are forgotten."""
    jobs = _jobs(request)
    _check_slot(jobs, job.namespace, request.app.state.mosaic.settings.max_searches)
    jobs[job.id] = job
    cancels: dict[str, threading.Event] = request.app.state.optimize_cancel
    for old in [j.id for j in jobs.values() if j.state != "running"][:-KEEP_JOBS]:  # finished ones: the last few
        jobs.pop(old, None)
        cancels.pop(old, None)
    cancels[job.id] = threading.Event()
    return job, cancels[job.id]


async def _run(service: Service, job: OptimizeJob, comp: Composition, options: OptimizeOptions, stop: threading.Event,
               store: Callable[..., Awaitable[SkillInfo]], threads: ThreadPoolExecutor) -> None:
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


@router.get("/v1/compositions/jobs", response_model=list[OptimizeJob], dependencies=admin)
async def list_jobs(request: Request) -> list[OptimizeJob]:
    ns = auth.namespace(request)
    return sorted((j for j in _jobs(request).values() if ns is None or in_namespace(j.name, ns)), key=lambda j: j.started)


@router.get("/v1/compositions/jobs/{job_id}", response_model=OptimizeJob, dependencies=admin)
async def get_job(job_id: str, request: Request) -> OptimizeJob:
    job = _jobs(request).get(job_id)
    ns = auth.namespace(request)
    if job is None or (ns is not None and not in_namespace(job.name, ns)):
        raise NotFoundError(f"no weight search {job_id!r} on this server", param="job_id")
    return job


@router.delete("/v1/compositions/jobs/{job_id}", response_model=OptimizeJob, dependencies=admin)
async def cancel_job(job_id: str, request: Request) -> OptimizeJob:
    """Cancel a running search (it stops after the evaluation in progress; nothing is stored)."""
    job = await get_job(job_id, request)
    if job.state == "running":
        request.app.state.optimize_cancel[job_id].set()
    return job
