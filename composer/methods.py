"""The merge methods. Each is a pure function over one module's factors.

Inputs arrive with each adapter's scaling s_i and weight w_i already folded into B_i, so
Σ_i B_i A_i is the exact weighted sum Σ_i w_i ΔW_i.
"""

from __future__ import annotations

from composer.lowrank import concat, truncate
from composer.registry import Factors, merge_method


@merge_method(
    "linear",
    reference="Ilharco et al., Editing Models with Task Arithmetic (ICLR 2023); exact by concatenation",
    space="factors",
    description="Exact Σ w_i ΔW_i by concatenating factors (rank Σ r_i); re-factored by SVD only if a smaller rank is asked.",
)
def linear(factors: list[Factors], *, rank: int | None) -> Factors:
    A, B = concat(factors)
    if rank is not None and rank < A.shape[0]:
        return truncate(A, B, rank)
    return A, B


@merge_method(
    "svd",
    reference="Eckart–Young; the low-rank QR+SVD route (no dense ΔW)",
    space="factors",
    description="The exact sum, truncated to the best rank-k approximation (Frobenius-optimal).",
    needs_rank=True,
)
def svd(factors: list[Factors], *, rank: int | None) -> Factors:
    A, B = concat(factors)
    return truncate(A, B, rank if rank is not None else A.shape[0])
