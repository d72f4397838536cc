"""LoRA-LEGO: rank-wise clustering of Minimal Semantic Units (MSUs).

A rank-r LoRA is a sum of r rank-1 units b_j a_jᵀ. Pool the units of every input (weights and
scalings folded into b), put each in a canonical form (a unit is unchanged by (c·a, b/c) and by
(−a, −b)), cluster their directions with k-means, and replace each cluster by one unit: the
result has rank K. Nothing here forms a dense ΔW.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from lora.factors import Factors, canonical_units, concat, truncate, unit_rows


def msu_pool(factors: list[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """All units of all inputs as rows: a (N × d_in), b (N × d_out); zero units are dropped."""
    a, b = unit_rows(*concat(factors))
    keep = (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)
    return a[keep], b[keep]


def features(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Clustering features: the unit's directions [a/‖a‖, b/‖b‖] (scale-free)."""
    f = torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)], 1) / 2**0.5
    return f.numpy()


def _sign_invariant_kmeans(
    a: torch.Tensor, b: torch.Tensor, k: int, *, n_init: int, seed: int, rounds: int = 10
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """k-means on unit directions where u and −u are the same point.

    The sign fixed by :func:`canonical_units` can disagree between two noisy copies of one unit
    (when its two largest entries are close); after each fit, a unit whose flipped direction
    is nearer to a centre is flipped, and k-means is refitted from the current centres.
    """
    f = features(a, b)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(f)
    for _ in range(rounds):
        centres = km.cluster_centers_
        d_pos = ((f[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
        d_neg = ((-f[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
        flip = d_neg < d_pos - 1e-12
        if not flip.any():
            break
        f[flip] *= -1
        sign = torch.from_numpy(np.where(flip, -1.0, 1.0))[:, None]
        a, b = a * sign, b * sign
        km = KMeans(n_clusters=k, init=centres, n_init=1, random_state=seed).fit(f)
    return a, b, km.labels_


def lego_merge(
    factors: list[Factors], k: int, *, centroid: str = "svd", output_reweight: bool = False, n_init: int = 4, seed: int = 0
) -> Factors:
    a, b = msu_pool(factors)
    n = a.shape[0]
    if n <= k:  # nothing to cluster: the exact sum already fits
        return a.float(), b.T.float()
    a, b = canonical_units(a, b, sign_from="both")  # equal units get equal coordinates
    a, b, labels = _sign_invariant_kmeans(a, b, k, n_init=n_init, seed=seed)
    out_a, out_b = [], []
    for c in range(k):
        idx = torch.from_numpy(np.flatnonzero(labels == c))
        if idx.numel() == 0:
            continue
        ca, cb = a[idx], b[idx]
        if centroid == "svd":
            # the cluster's own sum Σ b_j a_jᵀ, best rank-1 (sum-preserving as far as one unit can be)
            A1, B1 = truncate(ca.float(), cb.T.float(), 1)
            ua, ub = A1[0].double(), B1[:, 0].double()
        else:
            ua, ub = ca.mean(0), cb.mean(0)
            # parameter reweighting: averaging shrinks norms; restore the members' mean unit norm
            target = (ca.norm(dim=1) * cb.norm(dim=1)).mean()
            current = ua.norm() * ub.norm()
            if current > 0:
                s = (target / current).sqrt()
                ua, ub = ua * s, ub * s
            if output_reweight:
                ub = ub * (n / k) ** 0.5
        out_a.append(ua)
        out_b.append(ub)
    A = torch.stack(out_a).float()
    B = torch.stack(out_b, 1).float()
    return A, B
