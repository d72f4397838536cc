"""Turn several adapters into one, module by module, with a registered merge method."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from lora.adapter import LoraAdapter
from composer.errors import CompositionError
from lora.factors import Factors, frobenius_error_sq, frobenius_sq, truncate
from composer.registry import MethodContext, get_method


class CompositionCancelled(Exception):
    """The caller set ``stop`` while a composition ran."""


AUTO_RANK_CAP = 64  # "auto" rank never exceeds this unless the engine's limit says otherwise


@dataclass(frozen=True)
class ComposeReport:
    rank: int  # rank of the result
    exact_rank: int  # rank the exact sum would need
    refactored: bool  # True when the result was cut to fit ``max_rank``
    relative_error: float  # ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of that cut (0 when exact), over all modules
    weights: tuple[float, ...] = ()  # the adapter weights the method used (after e.g. PSEC's softmax/top-k)


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(module: str) -> int | None:
    m = _LAYER.search("." + module)
    return int(m.group(1)) if m else None


def varm_weights(norms_sq: list[float], weights: list[float]) -> list[float]:
    """FuseChat's VaRM for one module: w_i · ‖ΔW_i‖² / Σ_j ‖ΔW_j‖² (the module's share of change)."""
    total = sum(norms_sq)
    return [w * (n / total if total > 0 else 1.0 / len(norms_sq)) for w, n in zip(weights, norms_sq)]


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS: λ(ℓ) = α + β(ℓ−1)/(L−1) for layer ℓ = 1..L (shallow layers change least)."""
    if layer is None:
        return 1.0
    return alpha + beta * (layer / (num_layers - 1) if num_layers > 1 else 1.0)


def compose(
    adapters: list[LoraAdapter],
    weights: list[float] | tuple[float, ...],
    *,
    method: str = "linear",
    params: dict[str, Any] | None = None,
    rank: int | None = None,
    max_rank: int | None = None,
    base_model: str | None = None,
    weighting: str = "none",
    lines: tuple[float, float] | None = None,
    stop: threading.Event | None = None,
) -> tuple[LoraAdapter, ComposeReport]:
    """Compose ``adapters`` with ``weights`` into one adapter (scaling folded into B, r = lora_alpha).

    Modules are the union of the inputs' modules; each is composed from the adapters that
    have it. If the result's rank exceeds ``max_rank`` (an engine's limit) it is re-factored
    to ``max_rank`` by the low-rank SVD, and the report says so with the error it cost.

    Weighting helpers for any method: ``weighting="varm"`` scales each adapter's weight per
    module by its share of ‖ΔW‖² (computed from r×r traces); ``lines=(α, β)`` scales layer ℓ's
    composed update by α + β(ℓ−1)/(L−1).

    ``stop``: when it is set (e.g. the client went away), the work ends before the next module with
    :class:`CompositionCancelled`.
    """
    if weighting not in ("none", "varm"):
        raise ValueError(f"weighting must be 'none' or 'varm', got {weighting!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    merge = get_method(method)
    merge.check_inputs(len(adapters))
    params = merge.check_params(params or {})
    weights = merge.weights_fn(list(weights), params)
    per_adapter = [a.modules() for a in adapters]
    cap = max_rank or AUTO_RANK_CAP
    names = sorted(set().union(*per_adapter))
    num_layers = 1 + max((i for n in names if (i := layer_index(n)) is not None), default=0)
    out: dict[str, Factors] = {}
    exact_rank = 0
    err_sq = total_sq = 0.0
    refactored = False
    for name in names:
        if stop is not None and stop.is_set():
            raise CompositionCancelled("the composition was abandoned")
        inputs = tuple(i for i, m in enumerate(per_adapter) if name in m)
        present = [(per_adapter[i][name], weights[i]) for i in inputs]
        ws = [w for _, w in present]
        if weighting == "varm":
            ws = varm_weights([m.scaling**2 * frobenius_sq(m.A, m.B) for m, _ in present], ws)
        factors = [(m.A, (w * m.scaling) * m.B) for (m, _), w in zip(present, ws)]
        exact_rank = max(exact_rank, sum(a.shape[0] for a, _ in factors))
        ctx = MethodContext(module=name, cap=cap, layer=layer_index(name), inputs=inputs)
        A, B = merge.fn(factors, rank=rank, ctx=ctx, **params)
        if lines is not None:
            B = B * lines_scale(layer_index(name), num_layers, *lines)
        if max_rank is not None:
            total_sq += frobenius_sq(A, B)
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
    return result, ComposeReport(
        rank=result.rank, exact_rank=exact_rank, refactored=refactored, relative_error=rel, weights=tuple(weights)
    )
