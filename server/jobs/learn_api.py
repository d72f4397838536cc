"""Learned compositions (``POST /v1/compositions`` with ``"learn"``) as background jobs of the server.

They share the weight searches' job system (server/jobs/optimize_api.py): one job per namespace, MOSAIC_MAX_SEARCHES in
all, on the searches' own threads, polled and cancelled at ``/v1/compositions/jobs/{id}``. The job's progress names
the stage (baselines, learn per skill, learn, expand, scratch), its step and losses, and every stage's curve so far.
When it ends, the fusion (or its expansion) is stored as a skill whose record keeps the parent skills at their
versions, the fusion weights and the report (server/jobs/learn_composition.py); a cancelled job stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from fastapi import Request

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo
from adapter_store.validation import BaseModelSpec, TextLimits, validate_adapter
from composer.spec import Composition
from lora.errors import InvalidRequestError, MosaicError
from server.core.settings import Settings
from server.core.state import Service
from server.edge import auth
from server.jobs.board import Board, board
from server.jobs.expansion import ExpandOptions
from server.jobs.learn_composition import LearnCancelled, Learned, LearnOptions, learn_composition, router_weigher
from server.jobs.learned_weights import base_tokenizer, check_examples, reference_model
from server.jobs.optimize_api import OptimizeJob, _search_threads, claim

log = logging.getLogger("mosaic.learn")


def check_learn(options: LearnOptions, settings: Settings, tokenizer, ranks: list[int] | None = None) -> None:
    """A 400 naming the field before the job starts: fewer than 2 examples, too many or too long ones, a stored
    adapter above the rank the server stores and serves exactly (Σ the skills' ranks + the expansion's: fusion
    concatenates), or more tokens read in all than MOSAIC_MAX_JOB_TOKENS (every stage's steps × examples × the
    longest, and each report row's loss pass and greedy answers on the validation split)."""
    from server.jobs.fusion_learning import split_validation
    from server.jobs.learned_weights import ANSWER_TOKENS

    if len(options.examples) < 2:
        raise InvalidRequestError(f"learning a composition needs at least 2 examples with answers (one to train on, one "
                                  f"to validate with), got {len(options.examples)}", param="learn.examples")
    if ranks is not None:
        rank = sum(ranks) + (options.expand.rank if options.expand else 0)
        limit = min(settings.max_adapter_rank, settings.max_lora_rank)
        if rank > limit:
            raise InvalidRequestError(
                f"the learned adapter would have rank {rank} (the skills' ranks {'+'.join(map(str, ranks))}"
                f"{f' + the expansion {options.expand.rank}' if options.expand else ''}: a fusion concatenates them "
                f"exactly); the limit is {limit} (settings MOSAIC_MAX_ADAPTER_RANK {settings.max_adapter_rank}, "
                f"MOSAIC_MAX_LORA_RANK {settings.max_lora_rank})", param="learn.expand.rank" if options.expand else "skills")
    examples = [(e.prompt, e.answer, f"learn.examples[{i}]", f"learn.examples[{i}]")
                for i, e in enumerate(options.examples)]
    longest = check_examples(examples, settings, tokenizer, "learn.examples")
    passes = {"learn.steps": options.steps * (2 if options.baselines and options.granularity != "skill" else 1)}
    residual = options.expand or ExpandOptions()
    passes["learn.expand.steps"] = residual.steps * ((options.expand is not None) + options.baselines)
    rows = (len(ranks or [1]) + 6) if options.baselines else 2  # each skill alone, 2 merges, context, 2 learned, 2 LoRAs
    val = len(split_validation(list(range(len(examples))), options.validation, options.seed)[1])
    scoring = rows * val * (2 * longest + ANSWER_TOKENS)  # a loss pass, and greedy answers of up to ANSWER_TOKENS
    work = sum(passes.values()) * len(examples) * longest + scoring
    if work > settings.max_job_tokens:
        param = max(passes, key=passes.get) if scoring < work / 2 else "learn.validation"
        raise InvalidRequestError(
            f"learning would read about {work} tokens ({sum(passes.values())} passes over {len(examples)} examples × "
            f"{longest} tokens, the longest, and {scoring} to score {rows} report rows on {val} held-out examples); the "
            f"limit is {settings.max_job_tokens} (setting MOSAIC_MAX_JOB_TOKENS): ask for fewer steps, fewer or "
            "shorter examples, or no baselines", param=param)


def check_request(comp: Composition, fields_set: set[str], min_agreement: float | None) -> None:
    """``learn`` fuses the skills exactly: a field it would not honour is a 400, not ignored."""
    if comp.context_aware:
        raise InvalidRequestError("learn learns the weights from examples and 'auto' chooses them per prompt: send one "
                                  "of the two", param="learn")
    if comp.method != "linear" or comp.params or comp.rank is not None or comp.weighting != "none" or comp.lines:
        raise InvalidRequestError("learn fuses the skills exactly (concatenated factors, weights per skill, layer or "
                                  "module): method, params, rank, weighting and lines do not apply", param="learn")
    if min_agreement is not None or "quality_prompts" in fields_set:
        raise InvalidRequestError("a learned composition is measured by its own report on the held-out examples: "
                                  "use learn.min_validation instead of quality_prompts / min_agreement", param="learn")


async def start(request: Request, service: Service, comp: Composition, options: LearnOptions, *, name: str,
                description: str, examples: list[str]) -> OptimizeJob:
    """Check the job (skills exist, examples within their limits), then start it (202)."""
    namespace = auth.namespace(request)
    infos = [await service.cache.resolve(ref) for ref in comp.skills]  # a missing skill is a 404 now
    tokenizer = await asyncio.to_thread(base_tokenizer, service.model_dir)
    await asyncio.to_thread(check_learn, options, service.settings, tokenizer, [i.rank for i in infos])
    stages = [*(["baselines"] if options.baselines else []),
              *(["learn per skill"] if options.baselines and options.granularity != "skill" else []), "learn",
              *(["expand"] if options.expand else []), *(["scratch"] if options.baselines else [])]
    job, stop = claim(request, OptimizeJob(id=uuid.uuid4().hex[:16], kind="learn", name=name,
                                           skills=[i.ref for i in infos], started=time.time(),
                                           progress={"stages": stages, "stage": None}, namespace=namespace))
    threads = _search_threads(request, service.settings.max_searches)
    start_weights = list(comp.weights) if isinstance(comp.weights, tuple) else 1.0
    service.tasks.append(asyncio.get_running_loop().create_task(_run(
        service, job, [i.ref for i in infos], options, start_weights, stop, threads, description, examples,
        board(request.app.state))))
    return job


async def _run(service: Service, job: OptimizeJob, refs: list[str], options: LearnOptions, start_weights,
               stop: threading.Event, threads: ThreadPoolExecutor, description: str, examples: list[str],
               jobs: Board) -> None:
    curves: dict[str, list[list[float]]] = {}

    def progress(stage: str, step: int, steps: int, train_loss: float, val_loss: float) -> None:
        if step:
            curves.setdefault(stage, []).append([step, round(train_loss, 5), round(val_loss, 5)])
        job.progress = {**job.progress, "stage": stage, "step": step, "steps": steps,
                        "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5), "curves": curves}

    try:
        model = await asyncio.to_thread(reference_model, service)
        loaded = [await asyncio.to_thread(service.registry.load, ref) for ref in refs]
        infos, adapters = [i for i, _ in loaded], [a for _, a in loaded]
        pinned = [i.ref for i in infos]
        learned = await asyncio.get_running_loop().run_in_executor(threads, partial(
            learn_composition, model, adapters, pinned, options, weigh=router_weigher(service.policy, service.library_now, pinned), start=start_weights,
            progress=progress, stop=stop))
        if stop.is_set():
            raise LearnCancelled()
        job.result = await asyncio.to_thread(
            store_learned, service.registry, service.base_spec, learned, infos, options, name=job.name,
            description=description, examples=examples, max_rank=service.settings.max_adapter_rank,
            text=service.settings.text_limits(), stop=stop)
        job.state = "done"
    except LearnCancelled:
        job.state = "cancelled"
    except MosaicError as exc:
        job.state, job.error = "failed", exc.message
    except Exception as exc:  # reported to whoever polls (and logged); nothing is stored
        log.exception("learn job %s failed", job.id)
        job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        job.finished = time.time()
        await asyncio.to_thread(jobs.finish, job)


def store_learned(registry: Registry, spec: BaseModelSpec, learned: Learned, infos: list[SkillInfo],
                  options: LearnOptions, *, name: str, description: str = "", examples: list[str] | None = None,
                  max_rank: int, text: TextLimits = TextLimits(), stop: threading.Event | None = None) -> SkillInfo:
    """Validate the learned adapter like an upload and store it as the next version of ``name``: its record names
    the parent skills at their versions (and their content), the fusion weights, the expansion and the report.
    Its example prompts (for the router) are the task's own, unless the request gave some. ``stop`` set (a cancel
    that came while the job was finishing): LearnCancelled, nothing stored."""
    validate_adapter(learned.adapter, spec, max_rank=max_rank, name=name)
    refs = [i.ref for i in infos]
    expanded = options.expand is not None
    what = f"per {options.granularity}" + (f", expanded with a rank-{options.expand.rank} LoRA" if expanded else "")
    description = description or (f"Learned composition of {', '.join(refs)} ({what}) from "
                                  f"{len(options.examples)} examples")
    examples = examples or list(dict.fromkeys(e.prompt[:text.example_chars] for e in options.examples))
    record = {
        "skills": refs, "sha256": [i.sha256 for i in infos], "method": "fusion", "granularity": options.granularity,
        "fusion": learned.fusion.model_dump(mode="json"),
        "learn": {"options": options.model_dump(mode="json", exclude={"examples"}), "examples": len(options.examples),
                  "report": learned.report.model_dump(mode="json")},
    }
    if expanded:
        record["expansion"] = {**options.expand.model_dump(mode="json"),
                               "parent": {"skills": refs, "method": "fusion", "granularity": options.granularity}}
    if stop is not None and stop.is_set():
        raise LearnCancelled()
    return registry.add(name, learned.adapter, description=description[:text.description_chars],
                        examples=examples[:text.examples], tags=["learned"], origin="expansion" if expanded
                        else "composition", composition=record)
