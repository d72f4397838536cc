"""What a composition will cost before it runs: an estimate of its arithmetic and its peak memory, so a
server can refuse one over its budget (a 400 naming the setting) instead of running it for minutes.

The estimate is an upper bound from shapes alone (every input is assumed to touch every module it could):
- factor-space methods re-factor the concatenated factors: QR of (d_out × R) and (d_in × R) and an
  R × R SVD, about (d_in + d_out)·R² per module, R = Σ rᵢ;
- dense methods form n dense task vectors (n·d_out·d_in) and truncate their merge by an SVD of the
  d_out × d_in matrix (d_out·d_in·min(d_out, d_in)); their peak memory is n + 1 dense matrices;
- LoRA-LEGO clusters R rank-1 units of size d_in + d_out, ``n_init`` times, about 100 iterations each
  against at most R centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

from composer.registry import get_method

KMEANS_ITERATIONS = 100
BYTES_PER_VALUE = 4  # float32 work tensors


@dataclass(frozen=True)
class Cost:
    work: float  # multiply-adds, roughly
    peak_bytes: float  # the largest working set of one module


def compose_cost(method: str, params: dict, shapes: list[tuple[int, int]], ranks: list[int]) -> Cost:
    """``shapes``: (d_out, d_in) of every module the composition may touch; ``ranks``: each input's rank."""
    merge = get_method(method)
    n, R = len(ranks), sum(ranks)
    work = peak = 0.0
    for d_out, d_in in shapes:
        if merge.space == "dense":
            module_work = n * d_out * d_in + d_out * d_in * min(d_out, d_in)
            module_peak = (n + 1) * d_out * d_in * BYTES_PER_VALUE
        elif method == "lego":
            module_work = int(params.get("n_init", 4)) * KMEANS_ITERATIONS * R * R * (d_in + d_out)
            module_peak = 2 * R * (d_in + d_out) * BYTES_PER_VALUE
        else:
            module_work = (d_in + d_out) * R * R + R**3
            module_peak = 2 * R * (d_in + d_out) * BYTES_PER_VALUE
        work += module_work
        peak = max(peak, module_peak)
    return Cost(work=work, peak_bytes=peak)
