"""Low-rank linear algebra on LoRA factors, never forming the dense ΔW = B @ A."""

from __future__ import annotations

import torch


def concat(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
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


def truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-k Eckart–Young truncation of B @ A, as factors (A' k × d_in, B' d_out × k).

    The singular values are split evenly (√S on each side) so neither factor is badly scaled.
    """
    U, S, Vh = svd_factors(A, B)
    k = min(k, S.shape[0])
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :]


def frobenius_error_sq(A: torch.Tensor, B: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> float:
    """‖BA − B₂A₂‖²_F from r×r traces: tr((BᵀB)(AAᵀ)) − 2 tr((B₂ᵀB)(AA₂ᵀ)) + tr((B₂ᵀB₂)(A₂A₂ᵀ))."""
    A, B, A2, B2 = A.double(), B.double(), A2.double(), B2.double()
    t1 = torch.trace((B.T @ B) @ (A @ A.T))
    t2 = torch.trace((B2.T @ B) @ (A @ A2.T))
    t3 = torch.trace((B2.T @ B2) @ (A2 @ A2.T))
    return float(max(t1 - 2 * t2 + t3, torch.tensor(0.0, dtype=torch.float64)))


def frobenius_sq(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖BA‖²_F = tr((BᵀB)(AAᵀ)), from r×r matrices only."""
    A, B = A.double(), B.double()
    return float(torch.trace((B.T @ B) @ (A @ A.T)))
