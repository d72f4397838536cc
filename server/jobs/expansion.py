"""Skill expansion (PSEC): a new rank-r LoRA trained from a few examples on top of a frozen composition, or
from the composition's own factors at full strength, or from nothing (the from-scratch baseline a learned
composition is measured against).

Every variant is trained the same way, so they compare fairly: forward hooks on the base model's linear modules
add Σ_parts B (A x) per module (the frozen composition's factors, and the trainable ones), Adam on the mean answer
cross-entropy of the training examples (every example once per step), the best step by validation loss kept.
The result is exact LoRA factors per module (scaling folded into B), served as one adapter: the frozen composition
and the residual concatenated (concatenation = summation, ALGORITHMS.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lora.factors import concat
from server.jobs.fusion_learning import CurvePoint, Encoded, example_losses

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A r×d_in, B d_out×r), scaling folded into B


class ExpandOptions(BaseModel):
    """``learn.expand`` of a composition request: the residual LoRA trained on top of the learned composition."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(default=8, ge=1, le=64, description="rank of the new LoRA")
    steps: int = Field(default=20, ge=1, le=500, description="Adam steps at most (each: every training example once)")
    lr: float = Field(default=4e-3, gt=0.0, le=1.0, description="Adam's learning rate")
    patience: int = Field(default=5, ge=1, le=500, description="steps without a better validation loss before stopping")
    start: Literal["residual", "full"] = Field(default="residual", description=(
        "'residual': the composition frozen, only the new rank-r LoRA trained on top (B starts at 0); 'full': the "
        "composition's own factors trained too, starting from them at full strength"))


class ExpansionResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    factors: dict  # Factors of the whole adapter to serve (frozen part and trained part concatenated)
    best_step: int
    initial_val_loss: float
    best_val_loss: float
    curve: list[CurvePoint]
    stopped: Literal["budget", "early_stop", "cancelled"]
    seconds: float


def new_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Factors:
    """A fresh LoRA as PEFT starts one: A uniform in ±1/√d_in (kaiming, a=√5), B zero (ΔW = 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        bound = 1.0 / math.sqrt(d_in)
        out[name] = ((torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound, torch.zeros(d_out, rank))
    return out


class HookedLora:
    """Per module y = (W + B_f A_f) x + B (A x): ``frozen`` factors (constants, merged into the weights while
    hooked) and ``trained`` ones (leaf tensors, in forward hooks)."""

    def __init__(self, model, frozen: Factors, trained: Factors) -> None:
        self.model = model
        dtype = next(model.parameters()).dtype
        self.frozen = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in frozen.items()}
        self.trained = {k: (a.to(dtype).clone().requires_grad_(True), b.to(dtype).clone().requires_grad_(True))
                        for k, (a, b) in trained.items()}

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.trained.values() for t in pair]

    def snapshot(self) -> Factors:
        return {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in self.trained.items()}

    def _hook(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable:
        def add(module, args, output):
            x = args[0]
            for A, B in parts:
                output = output + (x @ A.T) @ B.T
            return output
        return add

    @contextmanager
    def hooked(self) -> Iterator["HookedLora"]:
        """The frozen factors merged into the weights (W + B A: no cost per token), the trained ones hooked; the
        model's parameters frozen; all restored after (the original weights copied back, bit for bit)."""
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        weights: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for p, _ in saved:
                p.requires_grad_(False)
            with torch.no_grad():
                for name, (A, B) in self.frozen.items():
                    weight = self.model.get_submodule(name).weight
                    weights[name] = weight.detach().clone()
                    weight += B @ A
            for name, parts in sorted(self.trained.items()):
                handles.append(self.model.get_submodule(name).register_forward_hook(self._hook([parts])))
            yield self
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for name, w in weights.items():
                    self.model.get_submodule(name).weight.copy_(w)
            for p, flag in saved:
                p.requires_grad_(flag)

    def loss(self, encoded: Sequence[Encoded], pad: int, batch: int = 8, *, grad: bool = False) -> float:
        total = 0.0
        with torch.set_grad_enabled(grad):
            for i in range(0, len(encoded), batch):
                part = example_losses(self.model, encoded[i:i + batch], pad).sum() / len(encoded)
                if grad:
                    part.backward()
                total += float(part.detach())
        return total


def module_shapes(model, modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each named linear module of ``model``."""
    out = {}
    for name in modules:
        linear = model.get_submodule(name)
        out[name] = (linear.out_features, linear.in_features)
    return out


def expand(model, tokenizer, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]], options: ExpandOptions, *,
           modules: Sequence[str], base: Factors | None = None, seed: int = 0, batch: int = 8,
           progress: Callable[[int, float, float], None] | None = None,
           stop: threading.Event | None = None) -> ExpansionResult:
    """Train a rank-``options.rank`` LoRA on ``modules`` from ``train`` (best step by loss on ``val``).

    ``base``: the composition's factors (scaling folded into B); None trains from scratch. With ``start``
    ``"residual"`` the base stays frozen and the result is base ⊕ residual; with ``"full"`` the base's factors are
    trained too (from where they are) beside the new rank. ``model``/``tokenizer``: the base model, held
    exclusively meanwhile; ``batch`` examples per forward pass. ``progress(step, train_loss, val_loss)``; ``stop``
    set ends before the next step."""
    from server.jobs.training import encode_pair

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    fresh = new_factors(module_shapes(model, modules), options.rank, seed)
    base = base or {}
    if options.start == "full" and base:
        trained = {k: concat([base[k], fresh[k]]) if k in base else fresh[k] for k in sorted(set(base) | set(fresh))}
        frozen: Factors = {}
    else:
        trained, frozen = fresh, base
    hooked = HookedLora(model, frozen, trained)
    train_ids = [encode_pair(tokenizer, p, a) for p, a in train]
    val_ids = [encode_pair(tokenizer, p, a) for p, a in val]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    opt = torch.optim.Adam(hooked.parameters(), lr=options.lr)
    curve: list[CurvePoint] = []
    stopped: Literal["budget", "early_stop", "cancelled"] = "budget"
    was_training = model.training
    model.eval()
    try:
        with hooked.hooked():
            best_val = initial_val = hooked.loss(val_ids, pad, batch)
            best, best_step, since = hooked.snapshot(), 0, 0
            for step in range(1, options.steps + 1):
                if stop is not None and stop.is_set():
                    stopped = "cancelled"
                    break
                opt.zero_grad()
                train_loss = hooked.loss(train_ids, pad, batch, grad=True)
                opt.step()
                val_loss = hooked.loss(val_ids, pad, batch)
                curve.append(CurvePoint(step=step, train_loss=train_loss, val_loss=val_loss))
                if progress:
                    progress(step, train_loss, val_loss)
                if val_loss < best_val:
                    best_val, best, best_step, since = val_loss, hooked.snapshot(), step, 0
                else:
                    since += 1
                    if since >= options.patience:
                        stopped = "early_stop"
                        break
    finally:
        model.train(was_training)
    served = {k: concat([f for f in (frozen.get(k), best.get(k)) if f is not None])
              for k in sorted(set(frozen) | set(best))}
    return ExpansionResult(factors={k: (a.float(), b.float()) for k, (a, b) in served.items()}, best_step=best_step,
                           initial_val_loss=initial_val, best_val_loss=best_val, curve=curve, stopped=stopped,
                           seconds=round(time.perf_counter() - t0, 3))
