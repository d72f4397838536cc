"""The merge methods. Each is a pure function over one module's factors.

Inputs arrive with each adapter's scaling s_i and weight w_i already folded into B_i, so
Σ_i B_i A_i is the exact weighted sum Σ_i w_i ΔW_i. Factor-space methods never form a dense
ΔW; the dense family forms one module's τ_i at a time (memory O(one module)) and re-factors
its result to the target rank by SVD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lora.factors import Factors, concat, truncate
from composer import dense
from composer.lego import lego_merge
from composer.registry import MAX_SKILLS, MethodContext, Param, merge_method

MAX_LAYERS = 1024  # bounds of layer indices
DENSITY = Param(float, 0.5, "fraction of entries kept per task vector", low=0.0, high=1.0)
SIGN = Param(str, "total", "sign election: 'total' (sign of the sum) or 'frequency' (majority count)",
             choices=("total", "frequency"))
DROP = Param(float, 0.5, "DARE drop rate p (each entry dropped with probability p, the rest rescaled by 1/(1-p))",
             low=0.0, high=0.99)
SEED = Param(int, 0, "random seed (per-module masks derive from it: same inputs, same bytes)", low=0, high=2**63 - 1)


def _at_most(A: torch.Tensor, B: torch.Tensor, rank: int | None) -> Factors:
    """(A, B) as they are, or truncated when a smaller rank is asked."""
    if rank is not None and rank < A.shape[0]:
        return truncate(A, B, rank)
    return A, B


def _exact(factors: list[Factors], rank: int | None) -> Factors:
    return _at_most(*concat(factors), rank)


@merge_method(
    "linear",
    reference="Ilharco et al., Editing Models with Task Arithmetic (ICLR 2023); exact by concatenation",
    space="factors",
    description="Exact Σ w_i ΔW_i by concatenating factors (rank Σ r_i); re-factored by SVD only if a smaller rank is asked.",
)
def linear(factors: list[Factors], *, rank: int | None, ctx: MethodContext) -> Factors:
    return _exact(factors, rank)


@merge_method(
    "svd",
    reference="Eckart–Young; the low-rank QR+SVD route (no dense ΔW)",
    space="factors",
    description="The exact sum, truncated to the best rank-k approximation (Frobenius-optimal).",
)
def svd(factors: list[Factors], *, rank: int | None, ctx: MethodContext) -> Factors:
    A, B = concat(factors)
    return truncate(A, B, rank if rank is not None else min(A.shape[0], ctx.cap))


def _psec_weights(weights: list[float], params: dict[str, Any]) -> list[float]:
    """PSEC's α: softmax(w / T) when T > 0, then the top-k kept and renormalised when k > 0."""
    w = torch.tensor(weights, dtype=torch.float64)
    if params["temperature"] > 0:
        w = torch.softmax(w / params["temperature"], 0)
    k = params["top_k"]
    if 0 < k < len(weights):
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[w.abs().topk(k).indices] = True
        w = torch.where(keep, w, torch.zeros_like(w))
        total = w.sum()
        if total.abs() > 1e-12:
            w = w / total
    return [float(x) for x in w]


@merge_method(
    "psec",
    reference="Liu et al., Skill Expansion and Composition in Parameter Space (PSEC, ICLR 2025)",
    space="factors",
    description="α-weighted exact sum of skills (α per request, e.g. from the router); optional softmax temperature "
    "and top-k; re-factored only if the rank must shrink.",
    params={
        "temperature": Param(float, 0.0, "softmax temperature over the weights (0: use the weights as α)", low=0.0, high=1e6),
        "top_k": Param(int, 0, "keep the k largest α and renormalise (0: all)", low=0, high=MAX_SKILLS),
    },
    weights_fn=_psec_weights,
)
def psec(factors: list[Factors], *, rank: int | None, ctx: MethodContext, temperature: float, top_k: int) -> Factors:
    return _exact(factors, rank)


def _dense_method(
    name: str, *, reference: str, description: str, params: dict[str, Param]
) -> Callable[[Callable[..., torch.Tensor]], Callable]:
    """Register a dense method from a function of the stacked τ (K × d_out × d_in) -> merged ΔW."""

    def register(on_taus: Callable[..., torch.Tensor]) -> Callable:
        def method(factors: list[Factors], *, rank: int | None, ctx: MethodContext, **p: Any) -> Factors:
            taus = torch.stack([B @ A for A, B in factors])
            merged = on_taus(taus, ctx=ctx, **p)
            return dense.refactor_dense(merged, rank, ctx.cap)

        method.__doc__ = on_taus.__doc__
        merge_method(name, reference=reference, space="dense", description=description, params=params)(method)
        return on_taus

    return register


@_dense_method(
    "ties",
    reference="Yadav et al., TIES-Merging (NeurIPS 2023)",
    description="Trim each τ_i to its top density by magnitude, elect a sign per entry, average the agreeing entries.",
    params={"density": DENSITY, "majority_sign_method": SIGN},
)
def ties(taus: torch.Tensor, *, ctx: MethodContext, density: float, majority_sign_method: str) -> torch.Tensor:
    return dense.task_arithmetic(taus, dense.by_magnitude(density), majority_sign_method)


def _dare(ctx: MethodContext, p: float, seed: int) -> dense.Sparsify:
    """DARE's drop with this module's own generator (same seed and module, same mask)."""
    return dense.by_dropout(p, torch.Generator().manual_seed(dense.module_seed(seed, ctx.module)))


@_dense_method(
    "dare_linear",
    reference="Yu et al., Language Models are Super Mario (DARE, ICML 2024)",
    description="Drop each entry of each τ_i with probability p, rescale the rest by 1/(1-p), sum.",
    params={"p": DROP, "seed": SEED},
)
def dare_linear(taus: torch.Tensor, *, ctx: MethodContext, p: float, seed: int) -> torch.Tensor:
    return dense.task_arithmetic(taus, _dare(ctx, p, seed))


@_dense_method(
    "dare_ties",
    reference="Yu et al. (DARE, ICML 2024) with TIES sign election (Yadav et al., NeurIPS 2023)",
    description="DARE's random drop and rescale, then TIES sign election and disjoint mean.",
    params={"p": DROP, "seed": SEED, "majority_sign_method": SIGN},
)
def dare_ties(taus: torch.Tensor, *, ctx: MethodContext, p: float, seed: int, majority_sign_method: str) -> torch.Tensor:
    return dense.task_arithmetic(taus, _dare(ctx, p, seed), majority_sign_method)


@_dense_method(
    "magnitude_prune",
    reference="Magnitude pruning of task vectors (as in peft merge_utils.magnitude_prune)",
    description="Keep the top density fraction of each τ_i by magnitude, then sum.",
    params={"density": DENSITY},
)
def magnitude_prune(taus: torch.Tensor, *, ctx: MethodContext, density: float) -> torch.Tensor:
    return dense.task_arithmetic(taus, dense.by_magnitude(density))


@_dense_method(
    "breadcrumbs",
    reference="Davari & Belilovsky, Model Breadcrumbs (ECCV 2024)",
    description="Per module and task, drop the largest beta and the smallest gamma fraction of |τ_i| (outliers and "
    "noise), then sum.",
    params={
        "beta": Param(float, 0.01, "fraction of the largest entries dropped", low=0.0, high=1.0),
        "gamma": Param(float, 0.85, "fraction of the smallest entries dropped", low=0.0, high=1.0),
    },
)
def breadcrumbs(taus: torch.Tensor, *, ctx: MethodContext, beta: float, gamma: float) -> torch.Tensor:
    if beta + gamma >= 1:
        raise ValueError(f"beta + gamma must be below 1, got {beta} + {gamma}")
    return dense.task_arithmetic(taus, dense.by_breadcrumbs(beta, gamma))


@_dense_method(
    "consensus",
    reference="Wang et al., Localizing Task Information for Improved Model Merging and Compression (TALL masks, "
    "ICML 2024)",
    description="Keep the entries of Σ τ_i that are important (|τ_i| ≥ λ|Σ τ − τ_i|) to at least k tasks (k is "
    "capped at the number of inputs that have the module, so a module only one skill touches is kept).",
    params={
        "k": Param(int, 2, "an entry survives when important to at least k tasks", low=1, high=MAX_SKILLS),
        "lam": Param(float, 0.5, "λ of the TALL mask", low=0.0, high=1e6),
    },
)
def consensus(taus: torch.Tensor, *, ctx: MethodContext, k: int, lam: float) -> torch.Tensor:
    return taus.sum(0) * dense.consensus_mask(taus, min(k, taus.shape[0]), lam)


@_dense_method(
    "pcb",
    reference="Du et al., Parameter Competition Balancing for Model Merging (PCB-merging, NeurIPS 2024)",
    description="Weigh each entry of each τ_i by intra-task importance and inter-task agreement (softmax balances), "
    "drop all but the top ratio per task, and average the τ_i by the kept balances.",
    params={"ratio": Param(float, 0.1, "fraction of each task's entries kept (by balance)", low=0.0, high=1.0)},
)
def pcb(taus: torch.Tensor, *, ctx: MethodContext, ratio: float) -> torch.Tensor:
    beta = dense.pcb_scores(taus)
    kept = torch.stack([b * dense.magnitude_mask(b, ratio) for b in beta])
    total = kept.sum(0)
    merged = (kept * taus.double()).sum(0) / torch.where(total > 0, total, torch.ones_like(total))
    return merged.to(taus.dtype)


@merge_method(
    "layer_swap",
    reference="Bandarkar et al., Layer Swapping for Zero-Shot Cross-Lingual Transfer in LLMs (2024)",
    space="factors",
    description="Each layer's modules come from one skill only (factors copied, weight folded in): layers in "
    "[start, end) from the second skill, every other layer from the first (the paper keeps the first and last "
    "layers of one expert and swaps in the middle of another). One or two skills.",
    max_inputs=2,
    params={
        "start": Param(int, 8, "first layer taken from the second skill", low=0, high=MAX_LAYERS),
        "end": Param(int, 22, "first layer after the swapped band", low=0, high=MAX_LAYERS),
    },
)
def layer_swap(factors: list[Factors], *, rank: int | None, ctx: MethodContext, start: int, end: int) -> Factors:
    if end < start:
        raise ValueError(f"layer_swap needs start <= end, got {start} > {end}")
    source = 1 if ctx.layer is not None and start <= ctx.layer < end else 0
    if source not in ctx.inputs:  # the skill this layer comes from does not touch this module: no update here
        A, B = factors[0]
        return torch.zeros_like(A[:1]), torch.zeros_like(B[:, :1])
    return _at_most(*factors[ctx.inputs.index(source)], rank)


@merge_method(
    "lego",
    reference="LoRA-LEGO: rank-wise clustering of Minimal Semantic Units (Zhao et al., 2024); sklearn KMeans",
    space="factors",
    description="Pool every rank-1 unit (a_j, b_j) of every input, cluster them into K groups (K = target rank), and "
    "replace each group by one unit. Never forms a dense ΔW.",
    params={
        # default chosen by measurement (bench/reports/lego_choice*.md): 'mean' has the larger reconstruction
        # error but the better task effect
        "centroid": Param(str, "mean", "a group's unit: 'mean' (mean of the canonicalised units, norm-reweighted; "
                          "shrinks interference) or 'svd' (best rank-1 of the group's sum; closest to the exact sum)",
                          choices=("svd", "mean")),
        "output_reweight": Param(bool, False, "'mean' only: scale B by sqrt(units/K) (the public re-implementation's "
                                 "output reweighting)"),
        "n_init": Param(int, 4, "k-means restarts (each one clusters every module again)", low=1, high=16),
        "seed": SEED,
    },
)
def lego(factors: list[Factors], *, rank: int | None, ctx: MethodContext, centroid: str, output_reweight: bool,
         n_init: int, seed: int) -> Factors:
    k = rank if rank is not None else max(a.shape[0] for a, _ in factors)
    return lego_merge(factors, k, centroid=centroid, output_reweight=output_reweight, n_init=n_init, seed=seed)
