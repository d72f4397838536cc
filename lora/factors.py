"""LoRA factor math, in one place for every room: the store's shard codec and the composer's methods.

A module's update is B @ A with A (r × d_in) and B (d_out × r); its rank-1 units are the pairs
(a_j, b_j) = (row j of A, column j of B), so B @ A = Σ_j b_j a_jᵀ. Nothing here forms the dense
B @ A: products go through QR of the factors and r × r cores, O((d_in + d_out) r²).
"""

from __future__ import annotations

from typing import Literal

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r × d_in, B: d_out × r), any scaling or weight folded into B


def concat(factors: list[Factors]) -> Factors:
    """[B_1 | … | B_K] · [A_1; …; A_K] = Σ B_i A_i exactly (concatenation = summation)."""
    A = torch.cat([a for a, _ in factors], 0)
    B = torch.cat([b for _, b in factors], 1)
    return A, B


def svd_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A as (U, S, Vh) via QR of both factors and an SVD of the small R×R core.

    B = Q_B R_B, Aᵀ = Q_A R_A, R_B R_Aᵀ = U' S V'ᵀ  ⇒  B A = (Q_B U') S (Q_A V')ᵀ.
    Cost O((d_in + d_out) R²) instead of a dense SVD's O(d_in d_out min(d_in, d_out)).
    Computed in float64 for stability, returned in float32.
    """
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return (Qb @ U).float(), S.float(), (Vh @ Qa.T).float()


def split_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> Factors:
    """Rank-k factors (A' k × d_in, B' d_out × k) of U diag(S) Vh, the singular values split evenly
    (√S on each side) so neither factor is badly scaled."""
    k = min(k, S.shape[0])
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :]


def truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> Factors:
    """The rank-k Eckart–Young truncation of B @ A, as factors."""
    return split_svd(*svd_factors(A, B), k)


def inner(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ), in float64 from r₁ × r₂ products only."""
    A1, B1, A2, B2 = A1.double(), B1.double(), A2.double(), B2.double()
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def frobenius_sq(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖BA‖²_F."""
    return inner(A, B, A, B)


def frobenius_error_sq(A: torch.Tensor, B: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor,
                       norm_sq: float | None = None) -> float:
    """‖BA − B₂A₂‖²_F = ‖BA‖² − 2⟨BA, B₂A₂⟩ + ‖B₂A₂‖² (``norm_sq``: ‖BA‖² when the caller has it)."""
    if norm_sq is None:
        norm_sq = frobenius_sq(A, B)
    return max(norm_sq - 2 * inner(A, B, A2, B2) + frobenius_sq(A2, B2), 0.0)


def unit_rows(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 units as rows in float64: a (r × d_in), b (r × d_out), Σ_j b_j a_jᵀ = scaling · B A."""
    return A.double(), (B.double() * scaling).T.contiguous()


def canonical_units(a: torch.Tensor, b: torch.Tensor,
                    sign_from: Literal["a", "both"] = "a") -> tuple[torch.Tensor, torch.Tensor]:
    """Units (rows of a and b) in a canonical form, each b_j a_jᵀ unchanged: a unit is the same under
    (c·a, b/c) and (−a, −b), so scale it to ‖a_j‖ = ‖b_j‖ (zero units stay as they are) and sign it so
    that the largest-magnitude entry of a_j (``"a"``), or of its directions [a_j/‖a_j‖, b_j/‖b_j‖]
    (``"both"``, for units without zeros), is positive."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
    a, b = a * c[:, None], b / c[:, None]
    if sign_from == "a":
        pivot = a
    else:
        pivot = torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)], 1)
    sign = pivot.gather(1, pivot.abs().argmax(dim=1, keepdim=True)).sign()
    sign[sign == 0] = 1
    return a * sign, b * sign
