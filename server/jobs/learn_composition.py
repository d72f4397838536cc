"""A composition learned from a few examples of a task that needs several skills at once, and its report.

The stages, on one train/validation split of the examples:

1. baselines (``learn.baselines``): each input skill alone, the best fixed merge (linear, every weight 1 or
   every weight 1/K), the context-aware composition (weights chosen per prompt by the router);
2. fusion learned per skill (LoraHub's granularity, by gradient), then at the requested granularity
   (per layer by default; server/jobs/fusion_learning.py);
3. expansion (``learn.expand``): a rank-r LoRA trained on top of the learned fusion (server/jobs/expansion.py);
4. the from-scratch baseline: a LoRA of the same rank trained with the same examples and steps, no skills.

Every row is scored on the validation prompts (greedy exact match and the answers' loss). What is stored is the
expansion when asked for, else the fusion; ``min_validation`` refuses a result whose exact match is below the
best input skill's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from composer import compose
from composer.fusion import FusionWeights, fuse
from lora.adapter import LoraAdapter
from lora.errors import InvalidRequestError, MosaicError
from server.jobs.expansion import ExpandOptions, expand
from server.jobs.fusion_learning import FusionOptions, FusionResult, learn_fusion, split_validation

Stage = Literal["baselines", "learn per skill", "learn", "expand", "scratch"]
Progress = Callable[[str, int, int, float, float], None]  # (stage, step, steps, train loss, validation loss)


class LearnExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1, description="the expected answer")


class LearnOptions(FusionOptions):
    """``"learn"`` of a composition request: fusion weights (and optionally a residual LoRA) from examples."""

    examples: list[LearnExample] = Field(default_factory=list, description=(
        "prompt/answer pairs of the task (at least 2: a share is held out for validation; at most MOSAIC_MAX_EXAMPLES)"))
    expand: ExpandOptions | None = Field(default=None, description="also train a residual LoRA on top of the learned "
                                         "fusion and store that (PSEC's skill expansion)")
    baselines: bool = Field(default=True, description="score the report's baselines too: each skill alone, the best "
                            "fixed merge, context-aware, per-skill weights, a LoRA trained from scratch")
    batch: int = Field(default=8, ge=1, le=16, description="examples per forward pass (gradients accumulate over the "
                       "rest): memory grows with it, so it is capped lower than a search's")
    min_validation: bool = Field(default=False, description="refuse to store a result whose validation exact match is "
                                 "below the best input skill's alone")

    @model_validator(mode="after")
    def _min_validation_needs_baselines(self) -> "LearnOptions":
        if self.min_validation and not self.baselines:
            raise ValueError("min_validation compares with each input skill alone, which only learn.baselines scores")
        return self


class Row(BaseModel):
    """One line of the report: a way to answer the task, scored on the validation prompts."""

    name: str
    kind: Literal["alone", "fixed", "context", "learned", "expanded", "scratch"]
    val_exact_match: float
    val_loss: float
    seconds: float
    weights: list | None = None  # per-skill weights, or the fusion table
    best_step: int | None = None
    stopped: str | None = None


class LearnReport(BaseModel):
    rows: list[Row]
    stored: str  # the name of the row that was stored
    train_examples: int
    val_examples: int
    curves: dict[str, list[list[float]]] = Field(default_factory=dict, description="per learned stage: [step, train "
                                                  "loss, validation loss]")
    seconds: float


class LearnCancelled(Exception):
    """The job was cancelled between two steps or stages: nothing is stored."""


class BelowBestInput(MosaicError):
    """The learned result scored below ``min_validation`` (the best input skill alone): nothing is stored."""

    code = "below_best_input"
    caller_fault = True


@dataclass
class Learned:
    adapter: LoraAdapter
    fusion: FusionWeights
    report: LearnReport
    candidates: dict[str, LoraAdapter | None]  # each row's adapter, by row name (rows with one adapter for all)


class LearnRun:
    """One learning job's state: the model (held one stage at a time), the split, the rows so far."""

    def __init__(self, lm, adapters: Sequence[LoraAdapter], skills: Sequence[str], options: LearnOptions, *,
                 progress: Progress | None = None, stop: threading.Event | None = None) -> None:
        self.lm, self.adapters, self.skills, self.options = lm, list(adapters), list(skills), options
        self.progress, self.stop = progress, stop
        pairs = [(e.prompt, e.answer) for e in options.examples]
        self.train, self.val = split_validation(pairs, options.validation, options.seed)
        self.rows: list[Row] = []
        self.candidates: dict[str, LoraAdapter | None] = {}
        self.curves: dict[str, list[list[float]]] = {}
        self.modules = sorted(set().union(*(a.module_names() for a in self.adapters)))
        self.base_model = self.adapters[0].config.get("base_model_name_or_path")

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise LearnCancelled()

    def score(self, name: str, kind: str, adapters: LoraAdapter | None | Sequence[LoraAdapter | None], t0: float,
              **extra) -> Row:
        """Greedy exact match and loss on the validation prompts: one adapter for all, or one per prompt."""
        per_prompt = adapters if isinstance(adapters, (list, tuple)) else [adapters] * len(self.val)
        if not isinstance(adapters, (list, tuple)):
            self.candidates[name] = adapters
        hits, losses = 0, []
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(per_prompt):
            groups.setdefault(id(a), []).append(i)
        for idx in groups.values():
            adapter = per_prompt[idx[0]]
            pairs = [self.val[i] for i in idx]
            answers = self.lm.answers(adapter, [p for p, _ in pairs])
            hits += sum(a.strip() == t.strip() for a, (_, t) in zip(answers, pairs))
            losses.append(self.lm.loss(adapter, pairs) * len(pairs))
        row = Row(name=name, kind=kind, val_exact_match=round(hits / len(self.val), 4),
                  val_loss=round(sum(losses) / len(self.val), 5), seconds=round(time.perf_counter() - t0, 3), **extra)
        self.rows.append(row)
        self.check_stop()
        return row

    def reporter(self, stage: str, steps: int) -> Callable[[int, float, float], None]:
        curve = self.curves.setdefault(stage, [])

        def report(step: int, train_loss: float, val_loss: float) -> None:
            curve.append([step, round(train_loss, 5), round(val_loss, 5)])
            if self.progress:
                self.progress(stage, step, steps, train_loss, val_loss)
        return report

    # ---- the stages ---------------------------------------------------------------------------------
    def baselines(self, weigh: Callable[[str], Sequence[float]] | None) -> None:
        k = len(self.adapters)
        for skill, adapter in zip(self.skills, self.adapters):
            self.score(f"{skill} alone", "alone", adapter, time.perf_counter())
        fixed = []
        for label, w in (("every weight 1", [1.0] * k), (f"every weight 1/{k}", [1.0 / k] * k)):
            t0 = time.perf_counter()
            merged = compose(self.adapters, w, method="linear")[0]
            fixed.append(self.score(f"fixed merge ({label})", "fixed", merged, t0, weights=w))
        worse = max(fixed, key=lambda r: (-r.val_exact_match, r.val_loss))
        self.rows.remove(worse)
        if weigh is not None:
            t0, built = time.perf_counter(), {}
            per_prompt = []
            for prompt, _ in self.val:
                w = tuple(round(float(x), 4) for x in weigh(prompt))
                if w not in built:
                    built[w] = compose(self.adapters, list(w), method="linear")[0] if any(w) else None
                per_prompt.append(built[w])
            self.score("context-aware", "context", per_prompt, t0)

    def learn(self, granularity: str, stage: str, start: Sequence[float] | float) -> FusionResult:
        options = self.options.model_copy(update={"granularity": granularity})
        with self.lm._lock:
            result = learn_fusion(self.adapters, self.train + self.val, options, skills=self.skills,
                                  model=self.lm.model, tokenizer=self.lm.tokenizer, start=start,
                                  progress=self.reporter(stage, options.steps), stop=self.stop, split=(self.train, self.val))
        self.check_stop()
        return result

    def scored_fusion(self, result: FusionResult, name: str) -> LoraAdapter:
        t0 = time.perf_counter() - result.seconds
        adapter = fuse(self.adapters, result.weights, base_model=self.base_model)
        self.score(name, "learned", adapter, t0, weights=[list(r) for r in result.weights.table],
                   best_step=result.best_step, stopped=result.stopped)
        return adapter

    def residual(self, stage: str, options: ExpandOptions, base: LoraAdapter | None, name: str, kind: str) -> LoraAdapter:
        t0 = time.perf_counter()
        factors = None if base is None else {k: (m.A.float(), m.scaling * m.B.float()) for k, m in base.modules().items()}
        with self.lm._lock:
            result = expand(self.lm.model, self.lm.tokenizer, self.train, self.val, options, modules=self.modules,
                            base=factors, seed=self.options.seed, batch=self.options.batch, progress=self.reporter(stage, options.steps),
                            stop=self.stop)
        self.check_stop()
        adapter = LoraAdapter.from_modules(result.factors, base_model=self.base_model)
        self.score(name, kind, adapter, t0, best_step=result.best_step, stopped=result.stopped)
        return adapter


def router_weigher(policy, library: Callable[[], tuple[int, Sequence]],
                   skills: Sequence[str]) -> Callable[[str], list[float]]:
    """``weigh(prompt)``: the context-aware weights ``policy`` (router.policy) gives a prompt over these skills, as
    serving them with ``weights: "auto"`` would (a skill left out weighs 0). ``library()``: (the registry's
    generation, the skills it routes among), as Service.library_now gives them (the policy caches per generation)."""
    from composer.spec import Composition

    template = Composition(skills=tuple(skills), weights="auto")

    def weigh(prompt: str) -> list[float]:
        generation, known = library()
        plan = policy.route_within(prompt, template, known, generation)
        chosen = dict(plan.active) if plan.kind == "composition" else ({plan.skill: 1.0} if plan.kind == "skill" else {})
        return [float(chosen.get(s, 0.0)) for s in skills]
    return weigh


def learn_composition(lm, adapters: Sequence[LoraAdapter], skills: Sequence[str], options: LearnOptions, *,
                      weigh: Callable[[str], Sequence[float]] | None = None, start: Sequence[float] | float = 1.0,
                      progress: Progress | None = None, stop: threading.Event | None = None) -> Learned:
    """Every stage of the module docstring on ``lm`` (server.jobs.learned_weights.LossModel: its model is held one
    stage at a time, so the server's other searches interleave). ``weigh(prompt)`` gives the context-aware
    weights of a prompt (None: that row is left out); ``start``: the skills' weights the fusion starts from (one
    for all, or one per skill; default 1, every skill at full strength). Raises LearnCancelled when ``stop`` is set, and
    BelowBestInput under ``min_validation``."""
    t0 = time.perf_counter()
    run = LearnRun(lm, adapters, skills, options, progress=progress, stop=stop)
    if options.baselines:
        if progress:
            progress("baselines", 0, 0, 0.0, 0.0)
        run.baselines(weigh)
    if options.baselines and options.granularity != "skill":
        per_skill = run.learn("skill", "learn per skill", start)
        run.scored_fusion(per_skill, "learned per skill")
    result = run.learn(options.granularity, "learn", start)
    stored_name = f"learned per {options.granularity}"
    stored = run.scored_fusion(result, stored_name)
    if options.expand is not None:
        stored_name = f"expanded (rank {options.expand.rank}, {options.expand.start})"
        stored = run.residual("expand", options.expand, stored, stored_name, "expanded")
    if options.baselines:
        scratch = options.expand or ExpandOptions()
        run.residual("scratch", scratch.model_copy(update={"start": "residual"}), None,
                     f"scratch (rank {scratch.rank}, {scratch.steps} steps)", "scratch")
    report = LearnReport(rows=run.rows, stored=stored_name, train_examples=len(run.train), val_examples=len(run.val),
                         curves=run.curves, seconds=round(time.perf_counter() - t0, 3))
    if options.min_validation:
        check_min_validation(report)
    return Learned(adapter=stored, fusion=result.weights, report=report,
                   candidates={r.name: run.candidates[r.name] for r in run.rows if r.name in run.candidates})


def check_min_validation(report: LearnReport) -> None:
    """BelowBestInput when the stored row's validation exact match is below the best input skill's alone."""
    alone = [r for r in report.rows if r.kind == "alone"]
    if not alone:
        raise InvalidRequestError("min_validation compares with each input skill alone: it needs learn.baselines",
                                  param="learn.min_validation")
    best = max(alone, key=lambda r: r.val_exact_match)
    got = next(r for r in report.rows if r.name == report.stored)
    if got.val_exact_match < best.val_exact_match:
        raise BelowBestInput(f"{got.name} answers {got.val_exact_match:.2f} of the validation prompts exactly, below "
                             f"{best.name} ({best.val_exact_match:.2f}): not stored (learn.min_validation)",
                             param="learn.min_validation")
