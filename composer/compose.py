"""Turn several adapters into one, module by module, with a registered merge method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapter_store.adapter import LoraAdapter
from adapter_store.errors import CompositionError
from composer.lowrank import frobenius_error_sq, truncate
from composer.registry import get_method


@dataclass(frozen=True)
class ComposeReport:
    rank: int  # rank of the result
    exact_rank: int  # rank the exact sum would need
    refactored: bool  # True when the result was cut to fit ``max_rank``
    relative_error: float  # ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of that cut (0 when exact), over all modules


def compose(
    adapters: list[LoraAdapter],
    weights: list[float] | tuple[float, ...],
    *,
    method: str = "linear",
    params: dict[str, Any] | None = None,
    rank: int | None = None,
    max_rank: int | None = None,
    base_model: str | None = None,
) -> tuple[LoraAdapter, ComposeReport]:
    """Compose ``adapters`` with ``weights`` into one adapter (scaling folded into B, r = lora_alpha).

    Modules are the union of the inputs' modules; each is composed from the adapters that
    have it. If the result's rank exceeds ``max_rank`` (an engine's limit) it is re-factored
    to ``max_rank`` by the low-rank SVD, and the report says so with the error it cost.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    spec = get_method(method)
    params = spec.check_params(params or {})
    per_adapter = [a.modules() for a in adapters]
    names = sorted(set().union(*per_adapter))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    exact_rank = 0
    err_sq = total_sq = 0.0
    refactored = False
    for name in names:
        factors = [
            (m[name].A, (w * m[name].scaling) * m[name].B)
            for m, w in zip(per_adapter, weights)
            if name in m
        ]
        exact_rank = max(exact_rank, sum(a.shape[0] for a, _ in factors))
        A, B = spec.fn(factors, rank=rank, **params)
        if max_rank is not None:
            total_sq += frobenius_error_sq(A, B, torch.zeros_like(A[:1]), torch.zeros_like(B[:, :1]))
            if A.shape[0] > max_rank:
                A2, B2 = truncate(A, B, max_rank)
                err_sq += frobenius_error_sq(A, B, A2, B2)
                A, B, refactored = A2, B2, True
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CompositionError(f"composition with {method!r} produced non-finite values in {name}")
        out[name] = (A, B)
    base = base_model or adapters[0].config.get("base_model_name_or_path")
    result = LoraAdapter.from_modules(out, base_model=base)
    rel = (err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return result, ComposeReport(rank=result.rank, exact_rank=exact_rank, refactored=refactored, relative_error=rel)
