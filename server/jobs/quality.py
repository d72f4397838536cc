"""The quality report of a stored composition: what it keeps of each skill it combines.

For each input skill, the share of its registered example prompts on which the composition gives the
skill's own greedy answer (exact text after trimming). A context-aware composition is asked the way it
will be served: each prompt with the weights the router chooses for it. The server answers with its
engine; the CLI (no engine running) with the transformers reference engine — the same greedy tokens.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel, Field

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo
from composer import Composition, compose
from lora.errors import InvalidRequestError
from router.plan import Plan

Answer = Callable[[Plan, Sequence[str]], Awaitable[list[str]]]  # greedy answers of a plan to prompts
Weigh = Callable[[str], Awaitable[Plan]]  # a context-aware composition's plan for one prompt

MAX_TOKENS = 48


class SkillAgreement(BaseModel):
    skill: str = Field(description="the input skill, name@version")
    prompts: int = Field(description="example prompts asked (0: the skill has none, agreement unknown)")
    agreement: float | None = Field(description="share of them answered exactly as the skill alone answers")


class QualityReport(BaseModel):
    skills: list[SkillAgreement]
    max_tokens: int = MAX_TOKENS
    engine: str
    seconds: float

    def weakest(self) -> SkillAgreement | None:
        known = [s for s in self.skills if s.agreement is not None]
        return min(known, key=lambda s: s.agreement) if known else None


async def quality_report(comp: Composition, infos: Sequence[SkillInfo], answer: Answer, weigh: Weigh | None,
                         *, engine: str, max_prompts: int = 8) -> QualityReport:
    """Agreement of ``comp`` with each input skill on that skill's example prompts (at most ``max_prompts``).
    ``weigh`` gives a context-aware composition's per-prompt plan; a fixed one is one plan for all prompts."""
    t0 = time.perf_counter()
    rows = []
    for info in infos:
        prompts = [p for p in info.examples if p.strip()][:max_prompts]
        if not prompts:
            rows.append(SkillAgreement(skill=info.ref, prompts=0, agreement=None))
            continue
        own = await answer(Plan(kind="skill", skill=info.ref), prompts)
        if weigh is None:
            merged = await answer(Plan(kind="composition", composition=comp), prompts)
        else:
            merged = await _per_prompt(prompts, answer, weigh)
        same = sum(a.strip() == b.strip() for a, b in zip(own, merged))
        rows.append(SkillAgreement(skill=info.ref, prompts=len(prompts), agreement=round(same / len(prompts), 4)))
    return QualityReport(skills=rows, engine=engine, seconds=round(time.perf_counter() - t0, 3))


async def _per_prompt(prompts: Sequence[str], answer: Answer, weigh: Weigh) -> list[str]:
    """Each prompt with its own plan; prompts whose plans agree are answered together."""
    groups: dict[str, tuple[Plan, list[int]]] = {}
    for i, p in enumerate(prompts):
        plan = await weigh(p)
        key = plan.model_dump_json(include={"composition"})
        groups.setdefault(key, (plan, []))[1].append(i)
    out = [""] * len(prompts)
    for plan, idx in groups.values():
        for i, text in zip(idx, await answer(plan, [prompts[i] for i in idx])):
            out[i] = text
    return out


def check_min_agreement(report: QualityReport, min_agreement: float | None) -> None:
    """Refuse (400, naming the skill) a composition that keeps less than ``min_agreement`` of some input."""
    if min_agreement is None:
        return
    for s in report.skills:
        if s.agreement is None:
            raise InvalidRequestError(f"min_agreement needs example prompts, and {s.skill} has none: add examples to it "
                                      "or leave min_agreement out", param="min_agreement")
        if s.agreement < min_agreement:
            raise InvalidRequestError(
                f"the composition gives {s.skill}'s own answer on {s.agreement:.0%} of its {s.prompts} example prompts, "
                f"below min_agreement {min_agreement:.0%}; nothing was stored", param="min_agreement")


def reference_answerer(registry: Registry, base_dir, max_rank: int) -> Answer:
    """Answers with the transformers reference engine (the CLI has no engine running)."""
    from server.jobs.training import greedy_answers

    def run(plan: Plan, prompts: Sequence[str]) -> list[str]:
        if plan.kind == "skill":
            adapter = registry.load(plan.skill)[1]
        else:
            active = plan.active if plan.alpha is not None else list(zip(plan.composition.skills,
                                                                         plan.composition.resolved_weights))
            if len(active) == 1 and plan.alpha is not None:
                adapter = registry.load(active[0][0])[1]
            else:
                comp = plan.composition.model_validate({**plan.composition.model_dump(),
                                                        "skills": [s for s, _ in active], "weights": [w for _, w in active]})
                adapter, _ = compose([registry.load(s)[1] for s in comp.skills], max_rank=max_rank, **comp.compose_kwargs())
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_dir(tmp)
            return greedy_answers(base_dir, tmp, list(prompts), MAX_TOKENS, batch_size=8)

    async def answer(plan: Plan, prompts: Sequence[str]) -> list[str]:
        return await asyncio.to_thread(run, plan, prompts)

    return answer


def engine_answerer(service) -> Answer:
    """Answers with the running server's engine, each plan served as a request would be (``service``: server.core.state.Service)."""
    from server.core.engine import GenerationParams
    from server.core.planner import serve_plan

    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)

    async def one(prompt: str, adapter) -> str:
        tok = service.engine.tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"][-(service.settings.max_prompt_tokens - MAX_TOKENS):]  # long: its end
        return "".join([c.text async for c in service.engine.generate(ids, params, adapter)])

    async def answer(plan: Plan, prompts: Sequence[str]) -> list[str]:
        adapter, _ = await serve_plan(service, plan)
        return list(await asyncio.gather(*(one(p, adapter) for p in prompts)))

    return answer
