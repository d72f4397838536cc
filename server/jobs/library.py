"""Library operations shared by the CLI and the HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from itertools import zip_longest
from typing import Annotated

from fastapi import Query

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo
from adapter_store.validation import BaseModelSpec, TextLimits, validate_adapter
from composer import ComposeReport, Composition
from lora.adapter import LoraAdapter
from server.core.compose_budget import Composer
from server.jobs.quality import Answer, Weigh, check_min_agreement, quality_report

MAX_PAGE = 1000
PageLimit = Annotated[int | None, Query(ge=1, le=MAX_PAGE, description="at most this many skills (default: all)")]
PageAfter = Annotated[str | None, Query(max_length=200, description="the skills after this name, by name")]


async def page(registry: Registry, namespace: str | None, after: str | None,
               limit: int | None) -> tuple[list[SkillInfo], bool]:
    """One page of the latest skills by name (``namespace``'s only, when given), and whether more follow."""
    skills = await asyncio.to_thread(registry.list, after or None, None if limit is None else limit + 1, namespace)
    return skills[:limit], limit is not None and len(skills) > limit


def stored_form(comp: Composition) -> Composition:
    """What is composed and stored for ``comp``: a context-aware template (``weights="auto"``) is stored as the
    plain sum, every skill at weight 1 (what a download gets); it is served with weights chosen per prompt."""
    return comp.with_weights([1.0] * len(comp.skills)) if comp.context_aware else comp


def store_composed(
    registry: Registry, spec: BaseModelSpec, comp: Composition, infos: list[SkillInfo],
    composed: tuple[LoraAdapter, ComposeReport], name: str, description: str = "", examples: list[str] | None = None,
    *, max_rank: int, quality: dict | None = None, extra: dict | None = None, text: TextLimits = TextLimits(),
) -> SkillInfo:
    """Validate ``comp``'s result (composed from ``infos``) like an upload, and store it as a new skill; what
    it inherits of its inputs' text (example prompts, a description naming them) within ``text``'s limits."""
    adapter, report = composed
    validate_adapter(adapter, spec, max_rank=max_rank, name=name)
    examples = examples or inherited_examples(infos, text.examples)
    if comp.context_aware:
        description = description or "Context-aware composition of " + ", ".join(i.ref for i in infos) + \
            " (weights chosen per prompt)"
    else:
        description = description or "Composition of " + ", ".join(f"{w:g}×{i.ref}" for w, i in zip(comp.resolved_weights, infos))
    return registry.add(
        name, adapter, description=description[:text.description_chars], examples=examples, origin="composition",
        composition={
            **comp.model_dump(mode="json"), "skills": [i.ref for i in infos], "sha256": [i.sha256 for i in infos],
            "refactored": report.refactored, "relative_error": report.relative_error,
            **({"quality": quality} if quality is not None else {}), **(extra or {}),
        },
    )


def inherited_examples(infos: list[SkillInfo], limit: int) -> list[str]:
    """The input skills' example prompts, taken in turn from each (so every input keeps a share), at most ``limit``."""
    taken = [e for group in zip_longest(*(i.examples for i in infos)) for e in group if e is not None]
    return list(dict.fromkeys(taken))[:limit]


async def create_and_store(
    registry: Registry, spec: BaseModelSpec, comp: Composition, name: str, description: str = "",
    examples: list[str] | None = None, *, max_rank: int, answer: Answer, weigh: Callable[[Composition], Weigh],
    engine: str, quality_prompts: int = 8, min_agreement: float | None = None, extra: dict | None = None,
    composer: Composer | None = None, text: TextLimits = TextLimits(),
) -> SkillInfo:
    """Pin the skills to their current versions, check the composition against ``composer``'s budget (none: the
    CLI's, unbounded), measure the quality report (unless ``quality_prompts`` is 0 and no ``min_agreement`` is
    asked), refuse below ``min_agreement``, then compose on ``composer``'s threads and store. ``answer``
    generates greedily (the server's engine or the reference engine); ``weigh(comp)`` gives a context-aware
    composition's per-prompt plans. Cancelled (the client left), the composition stops and nothing is stored."""
    composer = composer or Composer()
    infos = [await asyncio.to_thread(registry.info, ref) for ref in comp.skills]
    comp = comp.model_validate({**comp.model_dump(), "skills": [i.ref for i in infos]})  # what is measured is stored
    composer.check(stored_form(comp), infos)  # before any work
    quality = None
    if quality_prompts or min_agreement is not None:
        report = await quality_report(comp, infos, answer, weigh(comp) if comp.context_aware else None, engine=engine,
                                      max_prompts=quality_prompts or 8)
        check_min_agreement(report, min_agreement)
        quality = report.model_dump()
    infos, adapters = zip(*[await asyncio.to_thread(registry.load, i.ref) for i in infos])
    composed = await composer.compose(stored_form(comp), infos, adapters, max_rank=max_rank)
    return await asyncio.to_thread(store_composed, registry, spec, comp, list(infos), composed, name, description,
                                   examples, max_rank=max_rank, quality=quality, extra=extra, text=text)
