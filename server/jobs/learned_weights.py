"""Composition weights learned from a few examples (LoraHub, arXiv 2307.13269).

Minimise L(w) + λ·Σ|w_i| over the weights w of a composition, gradient-free: L is the mean per-token
cross-entropy of the expected answers under the base model with the composition merged in. The
search is nevergrad's NGOpt (as LoraHub), w_i in [-bound, bound]. LoraHub merges A and B separately
(cross terms); here every candidate is the exact composition Σ w_i ΔW_i (or the requested method).

The loss is computed with the transformers reference model (the base model's own weights, the
composition merged in), in a worker thread: the serving engine keeps serving meanwhile.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapter_store.skill_info import SkillInfo
from composer import Composition, compose
from lora.adapter import LoraAdapter
from lora.errors import InvalidRequestError
from server.core.compose_budget import Composer
from server.core.settings import Settings

ANSWER_TOKENS = 48  # a prompt sent without an answer gets the greedy answer of a skill, at most this long


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    answer: str | None = Field(default=None, description="the expected answer; none: the answer of the input skill "
                               "the router weighs highest for this prompt")


class OptimizeOptions(BaseModel):
    """``"optimize"`` of a composition request."""

    model_config = ConfigDict(extra="forbid")
    examples: list[Example | str] = Field(default_factory=list, description=(
        "prompt/answer pairs, or prompts alone (at most MOSAIC_MAX_EXAMPLES); none at all: each input skill's "
        "registered example prompts with the skill's own greedy answers as targets"))
    budget: int = Field(default=40, ge=1, le=2000, description="loss evaluations (LoraHub: 40)")
    l1: float = Field(default=0.05, ge=0.0, description="λ of the L1 penalty on the weights (LoraHub: 0.05)")
    bound: float = Field(default=1.5, gt=0.0, le=10.0, description="each weight is searched in [-bound, bound]")
    examples_per_skill: int = Field(default=5, ge=1, le=64, description="registered examples per skill (no examples given)")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="seed of the search (numpy's range)")

    @model_validator(mode="after")
    def _strings_are_prompts(self) -> "OptimizeOptions":
        self.examples = [Example(prompt=e) if isinstance(e, str) else e for e in self.examples]
        return self


class Trial(BaseModel):
    weights: list[float]
    loss: float
    objective: float


class OptimizeResult(BaseModel):
    weights: list[float]
    initial: Trial
    best: Trial
    trace: list[Trial]
    examples: int
    targets: str  # "given" | "skills' own answers" | "mixed"
    seconds: float
    cancelled: bool = False


class LossModel:
    """The base model (transformers, float32) scoring answers with one adapter merged in at a time."""

    def __init__(self, base_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        from lora.hf_loading import causal_lm

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.model = causal_lm(base_dir).eval()
        # the server's searches share one model, and each merges its adapter into the weights: one at a time
        self._lock = threading.Lock()

    @torch.inference_mode()
    def loss(self, adapter: LoraAdapter | None, pairs: Sequence[tuple[str, str]], batch: int = 8) -> float:
        """Mean per-token cross-entropy of each answer (its tokens and end of turn), averaged over examples."""
        from server.jobs.training import encode_pair, merged

        encoded = [encode_pair(self.tokenizer, p, a) for p, a in pairs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        per_example: list[float] = []
        with self._lock, merged(self.model, adapter):
            for i in range(0, len(encoded), batch):
                chunk = encoded[i:i + batch]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk])
                labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = labels[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
                counts = (target != -100).sum(1).clamp(min=1)
                per_example += (nll.sum(1) / counts).tolist()
        return float(np.mean(per_example))

    def answers(self, adapter: LoraAdapter | None, prompts: Sequence[str], max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
        from server.jobs.training import generate_greedy, merged

        with self._lock, merged(self.model, adapter):
            return generate_greedy(self.model, self.tokenizer, list(prompts), max_new_tokens, batch_size=8)


def training_pairs(options: OptimizeOptions, skills: Sequence[tuple[str, LoraAdapter, list[str]]], model: LossModel,
                   pick: Callable[[str], int]) -> tuple[list[tuple[str, str]], str]:
    """(prompt, target) pairs and where the targets came from. ``skills``: (ref, adapter, example prompts) per input;
    ``pick(prompt)`` is the index of the input skill that answers a prompt given without an answer."""
    if not options.examples:
        pairs = []
        for ref, adapter, prompts in skills:
            prompts = registered_prompts(prompts, options)
            pairs += zip(prompts, model.answers(adapter, prompts))
        if not pairs:
            raise _no_examples()
        return pairs, "skills' own answers"
    given = [(e.prompt, e.answer) for e in options.examples if e.answer is not None]
    bare = [e.prompt for e in options.examples if e.answer is None]
    by_skill: dict[int, list[str]] = {}
    for p in bare:
        by_skill.setdefault(pick(p), []).append(p)
    for i, prompts in by_skill.items():
        given += zip(prompts, model.answers(skills[i][1], prompts))
    return given, "given" if not bare else ("skills' own answers" if len(bare) == len(options.examples) else "mixed")


def _no_examples() -> InvalidRequestError:
    return InvalidRequestError("no examples given and the input skills have no example prompts: send optimize.examples",
                               param="optimize.examples")


def registered_prompts(prompts: Sequence[str], options: OptimizeOptions) -> list[str]:
    """The registered example prompts of one input skill that a search without examples scores."""
    return [p for p in prompts if p.strip()][: options.examples_per_skill]


def reference_model(service) -> LossModel:
    """The server's one transformers model for its jobs (LoraHub's loss, learned compositions), loaded on first use
    (seconds) and kept on ``service`` (server.core.state.Service)."""
    with service.reference_lock:
        if service.reference is None:
            service.reference = LossModel(service.model_dir)
        return service.reference


@lru_cache(maxsize=2)
def base_tokenizer(base_dir: str | Path):
    """The base model's tokenizer alone (what a search's examples are counted with before it starts)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def check_job(options: OptimizeOptions, infos: Sequence[SkillInfo], settings: Settings, tokenizer) -> None:
    """A 400 naming the field and the setting, before the search starts, when it would score too many examples
    (MOSAIC_MAX_EXAMPLES), one too long (MOSAIC_MAX_PROMPT_CHARS, counted first; MOSAIC_MAX_PROMPT_TOKENS), or
    read too many tokens in all (budget × examples × the longest, MOSAIC_MAX_JOB_TOKENS). A prompt without an
    answer counts ANSWER_TOKENS for the answer a skill will give it."""
    if options.examples:
        count_param = "optimize.examples"
        examples = [(e.prompt, e.answer, f"optimize.examples[{i}]", f"optimize.examples[{i}]")
                    for i, e in enumerate(options.examples)]
    else:
        count_param = "optimize.examples_per_skill"
        examples = [(p, None, f"{info.ref}'s example prompt {j}", "skills")
                    for info in infos for j, p in enumerate(registered_prompts(info.examples, options))]
    if not examples:
        raise _no_examples()
    longest = check_examples(examples, settings, tokenizer, count_param)
    if (work := options.budget * len(examples) * longest) > settings.max_job_tokens:
        raise InvalidRequestError(
            f"the search would read about {work} tokens ({options.budget} evaluations × {len(examples)} examples × "
            f"{longest} tokens, the longest); the limit is {settings.max_job_tokens} (setting MOSAIC_MAX_JOB_TOKENS): "
            "ask for a smaller budget, fewer or shorter examples", param="optimize.budget")


def check_examples(examples: Sequence[tuple[str, str | None, str, str]], settings: Settings, tokenizer,
                   count_param: str) -> int:
    """The longest example in tokens (its answer included), after a 400 naming the field and the setting when
    there are too many (MOSAIC_MAX_EXAMPLES) or one is too long (MOSAIC_MAX_PROMPT_CHARS, counted first;
    MOSAIC_MAX_PROMPT_TOKENS). ``examples``: (prompt, answer or None, what to call it, its param); a prompt
    without an answer counts ANSWER_TOKENS for the answer a skill will give it."""
    from server.jobs.training import encode_pair

    if len(examples) > settings.max_examples:
        raise InvalidRequestError(f"the search would score {len(examples)} examples; the limit is {settings.max_examples} "
                                  "(setting MOSAIC_MAX_EXAMPLES)", param=count_param)
    for prompt, answer, what, param in examples:
        if (n := len(prompt) + len(answer or "")) > settings.max_prompt_chars:
            raise InvalidRequestError(f"{what} has {n} characters; the limit is {settings.max_prompt_chars} "
                                      "(setting MOSAIC_MAX_PROMPT_CHARS)", param=param)
    limit = min(settings.max_prompt_tokens, settings.max_model_len - 1)
    longest = 0
    for prompt, answer, what, param in examples:
        n = len(encode_pair(tokenizer, prompt, answer or "")[0]) + (ANSWER_TOKENS if answer is None else 0)
        if n > limit:
            raise InvalidRequestError(f"{what} has {n} tokens with its answer; the limit is {limit} (context "
                                      f"{settings.max_model_len}, setting MOSAIC_MAX_PROMPT_TOKENS)", param=param)
        longest = max(longest, n)
    return longest


def learn_weights(comp: Composition, adapters: Sequence[LoraAdapter], pairs: Sequence[tuple[str, str]],
                  options: OptimizeOptions, model: LossModel, *, max_rank: int, targets: str = "given",
                  progress: Callable[[int, Trial, Trial], None] | None = None,
                  cancelled: Callable[[], bool] = lambda: False,
                  compose_with: Callable[[Composition], LoraAdapter] | None = None) -> OptimizeResult:
    """LoraHub's search. The start point is the request's weights if it gave numbers, else 0 (the base model,
    as LoraHub). ``progress(done, trial, best)`` after each evaluation; ``cancelled()`` stops the search
    between evaluations (the result so far is returned, marked cancelled). ``compose_with(candidate)`` builds
    each candidate (default: composer.compose here, in this thread)."""
    import nevergrad as ng

    if compose_with is None:
        def compose_with(c: Composition) -> LoraAdapter:
            return compose(list(adapters), max_rank=max_rank, **c.compose_kwargs())[0]

    k = len(adapters)
    init = np.clip(np.array(comp.weights if isinstance(comp.weights, tuple) else [0.0] * k, dtype=np.float64),
                   -options.bound, options.bound)
    t0 = time.perf_counter()
    trace: list[Trial] = []

    def evaluate(w: np.ndarray) -> Trial:
        w = [round(float(x), 6) for x in w]
        if any(w):
            adapter = compose_with(comp.with_weights(w))
        else:
            adapter = None  # every weight 0: the base model
        loss = model.loss(adapter, pairs)
        if not math.isfinite(loss):
            loss = 1e6
        trial = Trial(weights=w, loss=round(loss, 6), objective=round(loss + options.l1 * sum(abs(x) for x in w), 6))
        trace.append(trial)
        return trial

    initial = best = evaluate(init)
    if progress:
        progress(1, initial, best)
    param = ng.p.Array(init=init, lower=-options.bound, upper=options.bound)
    param.random_state = np.random.RandomState(options.seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=max(options.budget - 1, 1))
    stopped = False
    for done in range(2, options.budget + 1):
        if cancelled():
            stopped = True
            break
        candidate = optimizer.ask()
        trial = evaluate(candidate.value)
        optimizer.tell(candidate, trial.objective)
        if trial.objective < best.objective:
            best = trial
        if progress:
            progress(done, trial, best)
    return OptimizeResult(weights=best.weights, initial=initial, best=best, trace=trace, examples=len(pairs), targets=targets,
                          seconds=round(time.perf_counter() - t0, 3), cancelled=stopped)


def optimize_composition(registry, comp: Composition, options: OptimizeOptions, model: LossModel,
                         pick_for: Callable[[Composition], Callable[[str], int]], *, max_rank: int,
                         progress: Callable[[int, Trial, Trial], None] | None = None,
                         stop: threading.Event | None = None,
                         composer: Composer | None = None) -> tuple[Composition, OptimizeResult]:
    """The whole search for a composition in the registry: skills pinned to their current versions, the
    training pairs, LoraHub's search. Returns the composition with the best weights, and the result (with its
    trace). ``pick_for(template)(prompt)`` is the input skill answering a prompt sent without an answer.
    Each candidate is composed by ``composer`` (the server's: within its budget, on its threads; none: an
    unbounded one); ``stop`` set ends the search after the evaluation in progress, or during its composition
    (composer.CompositionCancelled)."""
    composer = composer or Composer()
    loaded = [registry.load(ref) for ref in comp.skills]
    pinned = comp.model_validate({**comp.model_dump(), "skills": [info.ref for info, _ in loaded]})
    infos, adapters = [i for i, _ in loaded], [a for _, a in loaded]
    template = pinned.model_validate({**pinned.model_dump(), "weights": "auto"})
    pairs, targets = training_pairs(options, [(i.ref, a, i.examples) for i, a in loaded], model, pick_for(template))
    result = learn_weights(
        pinned, adapters, pairs, options, model, max_rank=max_rank, targets=targets, progress=progress,
        cancelled=stop.is_set if stop is not None else (lambda: False),
        compose_with=lambda c: composer.compose_blocking(c, infos, adapters, max_rank=max_rank, stop=stop)[0])
    return pinned.with_weights(result.weights), result


def optimize_record(options: OptimizeOptions, result: OptimizeResult) -> dict:
    """What a stored composition keeps of its search (under ``composition.optimize``)."""
    return {"options": options.model_dump(mode="json"), **result.model_dump(mode="json")}
