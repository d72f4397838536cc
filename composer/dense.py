"""Building blocks of the dense task-vector family (TIES, DARE, breadcrumbs, TALL/consensus, PCB).

Each works on one module's stacked task vectors τ (K × d_out × d_in), the weights already
folded in (τ_i = w_i s_i B_i A_i). :func:`task_arithmetic` is the family's common shape (sparsify,
sign consensus, sum or disjoint mean), as in mergekit's generalized task arithmetic; methods in
``composer.methods`` are configurations of it, or of the other parts here, as peft's ``merge_utils``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from lora.factors import Factors, split_svd

Sparsify = Callable[[torch.Tensor], torch.Tensor]  # one task vector τ_i -> its sparsified τ̂_i


def module_seed(seed: int, module: str) -> int:
    """A stable per-module seed: the same (seed, module) draws the same mask on every run and host."""
    return zlib.crc32(f"{seed}:{module}".encode()) & 0x7FFFFFFF


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of |t| (k = int(density · numel), as peft does).

    Selection by the k-th largest magnitude (O(n), unlike a full top-k); magnitudes tied at the
    threshold are all kept, which random real-valued weights never produce.
    """
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    mags = t.abs().reshape(-1)
    threshold = mags.kthvalue(mags.numel() - k + 1).values
    return (mags >= threshold).reshape(t.shape)


def random_keep(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def elect_sign(taus: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election: +1/−1 per entry by the sign of Σ τ_i ("total") or by count ("frequency")."""
    if method == "total":
        score = taus.sum(0)
    elif method == "frequency":
        score = taus.sign().sum(0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return torch.where(score >= 0, 1.0, -1.0).to(taus.dtype)


def disjoint_merge(taus: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the task vectors whose entry agrees with the elected sign (zeros never agree)."""
    agree = taus.sign() == sign
    return (taus * agree).sum(0) / agree.sum(0).clamp(min=1)


def breadcrumbs_mask(t: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``beta`` and the bottom ``gamma`` fractions of |t| (by
    selection thresholds, O(n))."""
    mags = t.abs().reshape(-1)
    n = mags.numel()
    top, bottom = int(beta * n), int(gamma * n)
    keep = torch.ones(n, dtype=torch.bool)
    if top > 0:
        keep &= mags < mags.kthvalue(n - top + 1).values
    if bottom > 0:
        keep &= mags > mags.kthvalue(bottom).values
    return keep.reshape(t.shape)


def consensus_mask(taus: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """TALL masks: entry e is important to task i when |τ_i| ≥ λ·|τ_MTL − τ_i|; keep entries
    important to at least ``k`` tasks."""
    total = taus.sum(0)
    important = taus.abs() >= lam * (total - taus).abs()
    return important.sum(0) >= k


def task_arithmetic(taus: torch.Tensor, sparsify: Sparsify | None = None, sign: str | None = None) -> torch.Tensor:
    """Generalized task arithmetic: sparsify each τ_i, then sum them (``sign`` None) or elect a sign per
    entry (``"total"``/``"frequency"``, :func:`elect_sign`) and take the disjoint mean (TIES)."""
    if sparsify is not None:
        taus = torch.stack([sparsify(t) for t in taus])
    if sign is None:
        return taus.sum(0)
    return disjoint_merge(taus, elect_sign(taus, sign))


def by_magnitude(density: float) -> Sparsify:
    """TIES trim / magnitude pruning: keep the top ``density`` fraction of each τ_i by |τ_i|."""
    return lambda t: t * magnitude_mask(t, density)


def by_dropout(p: float, generator: torch.Generator) -> Sparsify:
    """DARE: drop each entry with probability ``p`` and rescale the rest by 1/(1 − p); the tasks draw
    from ``generator`` in order."""
    return lambda t: random_keep(t, 1.0 - p, generator)


def by_breadcrumbs(beta: float, gamma: float) -> Sparsify:
    """Model Breadcrumbs: drop the top ``beta`` and the bottom ``gamma`` fractions of each |τ_i|."""
    return lambda t: t * breadcrumbs_mask(t, beta, gamma)


def refactor_dense(M: torch.Tensor, rank: int | None, cap: int) -> Factors:
    """Best rank-k factors (A k × d_in, B d_out × k) of a dense module update, by its SVD.

    ``rank`` None ("auto") takes the numerical rank, capped at ``cap``.
    """
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    if rank is None:
        tol = S[0].item() * max(M.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
        rank = max(1, min(int((S > tol).sum()), cap))
    return split_svd(U, S, Vh, rank)


def minmax(t: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of one task's entries to [0, 1] (all equal: zeros)."""
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def pcb_scores(taus: torch.Tensor) -> torch.Tensor:
    """PCB-merging's balance β_i = β_intra,i ⊙ β_inter,i per entry of each task vector (K × …), with
    β_intra,i = softmax(N·norm(τ_i ⊙ τ_i)) and β_inter,i = Σ_j softmax(N·norm(τ_i ⊙ τ_j)), softmax over
    the entries of one task, N the number of tasks."""
    n = taus.shape[0]
    flat = taus.reshape(n, -1).double()

    def soft(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(n * minmax(x), 0)

    intra = torch.stack([soft(t * t) for t in flat])
    inter = torch.stack([sum(soft(flat[i] * flat[j]) for j in range(n)) for i in range(n)])
    return (intra * inter).reshape(taus.shape)
