"""Fusion weights learned by gradient from a few examples (LoRA Soups' learned concatenation weights, LoRA-Flow's
layer-wise fusion), at the granularity of :mod:`composer.fusion`: per skill, per (skill, layer) or per (skill, module).

The loss is the mean per-token cross-entropy of the answers (their tokens and end of turn), averaged over examples,
as :class:`server.jobs.learned_weights.LossModel` scores them, under the base model with every target module computing
y = W x + Σ_i w_{i,g} · s_i B_i (A_i x) (forward hooks on its ``nn.Linear`` modules). The skills' factors and the base
model are frozen; only the table w is trained. The fused update is linear in w, so its gradient is exact and costs
one backward pass: Adam on L(w) + λ · Σ (w − w₀)² / G (G columns: the pull towards the start is the same for a
uniform shift at every granularity), early stopping on a validation split taken from the examples.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from composer.fusion import FusionWeights, Granularity, ModuleStack, stacks
from lora.adapter import LoraAdapter
from lora.errors import InvalidRequestError

Encoded = tuple[list[int], list[int]]  # (input ids, labels with -100 off the answer), as server.jobs.training.encode_pair


class FusionOptions(BaseModel):
    """How a fusion is learned (the ``learn`` part of a composition request will carry these)."""

    model_config = ConfigDict(extra="forbid")
    granularity: Granularity = Field(default="layer", description="one weight per skill, per (skill, layer) or per "
                                     "(skill, module)")
    steps: int = Field(default=60, ge=1, le=2000, description="Adam steps at most (each: every training example once)")
    lr: float = Field(default=0.3, gt=0.0, le=10.0, description="Adam's learning rate")
    l2: float = Field(default=0.01, ge=0.0, le=1e3, description="λ of the pull towards the start: λ·Σ(w − w₀)²/columns")
    validation: float = Field(default=0.3, gt=0.0, lt=1.0, description="fraction of the examples held out for early "
                              "stopping (at least one, and at least one left to train on)")
    patience: int = Field(default=4, ge=1, le=2000,
                          description="steps without a better validation loss before stopping")
    batch: int = Field(default=8, ge=1, le=256,
                       description="examples per forward pass (gradients accumulate over the rest)")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="seed of the validation split")


class CurvePoint(BaseModel):
    step: int
    train_loss: float  # at the weights the step started from (the loss its gradient is of), without the L2 term
    val_loss: float  # at the weights after the step


class FusionResult(BaseModel):
    weights: FusionWeights  # the best by validation loss (the start when no step improved on it)
    start: FusionWeights
    best_step: int  # 0: the start
    initial_val_loss: float
    best_val_loss: float
    curve: list[CurvePoint]
    stopped: Literal["budget", "early_stop", "cancelled"]
    train_examples: int
    val_examples: int
    seconds: float


def split_validation(pairs: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) after a seeded shuffle: round(n·fraction) held out, at least one, and at least one
    left to train on (so at least two examples are needed)."""
    if len(pairs) < 2:
        raise InvalidRequestError(f"learning a fusion needs at least 2 examples (one to train on, one to validate "
                                  f"with), got {len(pairs)}", param="examples")
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    n_val = min(max(1, round(len(shuffled) * fraction)), len(shuffled) - 1)
    return shuffled[n_val:], shuffled[:n_val]


def example_losses(model, chunk: Sequence[Encoded], pad: int) -> torch.Tensor:
    """Each example's mean cross-entropy over its answer tokens (right-padded batch, labels shifted by one), as
    LossModel.loss computes it; differentiable."""
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    return nll.sum(1) / (target != -100).sum(1).clamp(min=1)


class FusedModel:
    """A transformers causal LM with skills' factors hooked onto its linear modules, the fusion table ``w``
    (K × G) a leaf tensor: inside :meth:`hooked`, module outputs are W x + Σ_i w_{i,g} s_i B_i (A_i x).

    The caller holds the model for itself while hooks are on (the server's LossModel lock)."""

    def __init__(self, model, adapters: Sequence[LoraAdapter], weights: FusionWeights) -> None:
        self.model = model
        self.template = weights
        dtype = next(model.parameters()).dtype
        self.stacks: dict[str, ModuleStack] = stacks(adapters, weights, dtype=dtype)
        problems = []
        for name, st in self.stacks.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                problems.append(f"{name}: the model has no such module")
                continue
            if not isinstance(linear, torch.nn.Linear):
                problems.append(f"{name}: a {type(linear).__name__}, not a linear layer")
            elif (linear.out_features, linear.in_features) != (st.B.shape[0], st.A.shape[1]):
                problems.append(f"{name}: factors for {st.B.shape[0]}×{st.A.shape[1]}, the module is "
                                f"{linear.out_features}×{linear.in_features}")
        if problems:
            raise InvalidRequestError("the skills do not fit the model: " + "; ".join(problems[:8]), param="skills")
        self.w = weights.tensor(dtype).requires_grad_(True)

    def weights(self) -> FusionWeights:
        return self.template.with_table(self.w)

    def set_weights(self, weights: FusionWeights | torch.Tensor) -> None:
        table = weights.tensor(self.w.dtype) if isinstance(weights, FusionWeights) else weights
        with torch.no_grad():
            self.w.copy_(table)

    def _hook(self, st: ModuleStack) -> Callable:
        def add_fusion(module, args, output):
            return output + ((args[0] @ st.A.T) * st.row_weights(self.w)) @ st.B.T
        return add_fusion

    @contextmanager
    def hooked(self) -> Iterator["FusedModel"]:
        """The hooks on, the model's own parameters frozen (no gradients kept for them); all restored after."""
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = []
        try:
            for p, _ in saved:
                p.requires_grad_(False)
            for name, st in self.stacks.items():
                handles.append(self.model.get_submodule(name).register_forward_hook(self._hook(st)))
            yield self
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved:
                p.requires_grad_(flag)

    def loss(self, encoded: Sequence[Encoded], pad: int, batch: int = 8, *, grad: bool = False) -> float:
        """Mean over examples of each answer's mean token cross-entropy at the current ``w``. With ``grad``, the
        gradient of that mean is accumulated into ``w.grad`` (one chunk of ``batch`` examples at a time). Call
        inside :meth:`hooked`."""
        total = 0.0
        with torch.set_grad_enabled(grad):
            for i in range(0, len(encoded), batch):
                part = example_losses(self.model, encoded[i:i + batch], pad).sum() / len(encoded)
                if grad:
                    part.backward()
                total += float(part.detach())
        return total


def learn_fusion(adapters: Sequence[LoraAdapter], pairs: Sequence[tuple[str, str]], options: FusionOptions, *,
                 skills: Sequence[str], model, tokenizer, start: FusionWeights | float | Sequence[float] = 1.0,
                 progress: Callable[[int, float, float], None] | None = None,
                 stop: threading.Event | None = None,
                 split: tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]] | None = None) -> FusionResult:
    """Learn fusion weights of ``adapters`` (named ``skills``) on (prompt, answer) ``pairs``.

    ``start``: the first weights (a FusionWeights at ``options.granularity``, or per-skill values broadcast to
    every column; default 1.0, every skill at full strength). ``model``/``tokenizer``: a transformers causal LM of
    the skills' base model and its tokenizer (the server's LossModel's, held exclusively meanwhile; a tiny model in
    tests). ``progress(step, train_loss, val_loss)`` after each step; ``stop`` set ends the learning before the next
    step (the result so far, marked ``"cancelled"``). ``split``: (train, validation) already taken (default: split
    ``pairs`` by ``options.validation``). Returns the weights with the best validation loss."""
    from server.jobs.training import encode_pair

    t0 = time.perf_counter()
    modules = sorted(set().union(*(a.module_names() for a in adapters)))
    if not isinstance(start, FusionWeights):
        start = FusionWeights.broadcast(options.granularity, skills, modules, start)
    elif start.granularity != options.granularity:
        raise InvalidRequestError(f"start weights are per {start.granularity}, the learning per {options.granularity}",
                                  param="granularity")
    train, val = split or split_validation(pairs, options.validation, options.seed)
    train_ids = [encode_pair(tokenizer, p, a) for p, a in train]
    val_ids = [encode_pair(tokenizer, p, a) for p, a in val]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    was_training = model.training
    model.eval()
    fused = FusedModel(model, adapters, start)
    w0 = fused.w.detach().clone()
    opt = torch.optim.Adam([fused.w], lr=options.lr)
    curve: list[CurvePoint] = []
    stopped: Literal["budget", "early_stop", "cancelled"] = "budget"
    try:
        with fused.hooked():
            best_val = initial_val = fused.loss(val_ids, pad, options.batch)
            best_w, best_step, since = w0.clone(), 0, 0
            for step in range(1, options.steps + 1):
                if stop is not None and stop.is_set():
                    stopped = "cancelled"
                    break
                opt.zero_grad()
                train_loss = fused.loss(train_ids, pad, options.batch, grad=True)
                if options.l2 > 0:
                    (options.l2 * ((fused.w - w0) ** 2).sum() / w0.shape[1]).backward()
                opt.step()
                val_loss = fused.loss(val_ids, pad, options.batch)
                curve.append(CurvePoint(step=step, train_loss=train_loss, val_loss=val_loss))
                if progress:
                    progress(step, train_loss, val_loss)
                if val_loss < best_val:
                    best_val, best_w, best_step, since = val_loss, fused.w.detach().clone(), step, 0
                else:
                    since += 1
                    if since >= options.patience:
                        stopped = "early_stop"
                        break
    finally:
        model.train(was_training)
    return FusionResult(weights=start.with_table(best_w), start=start, best_step=best_step,
                        initial_val_loss=initial_val, best_val_loss=best_val, curve=curve, stopped=stopped,
                        train_examples=len(train), val_examples=len(val), seconds=round(time.perf_counter() - t0, 3))
