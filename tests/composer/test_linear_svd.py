"""linear and svd against independent oracles: dense float64 sums and the dense truncated SVD."""

import pytest
import torch

from lora.factors import frobenius_error_sq, truncate
from composer import METHODS, compose
from tests.helpers import dense_delta, random_adapter

SHAPES = {"layers.0.q": (24, 16), "layers.0.v": (8, 16), "layers.1.q": (24, 16)}


def _oracle_sum(adapters, weights):
    total: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights):
        for n, d in dense_delta(a).items():
            total[n] = total.get(n, 0) + w * d
    return total


def _mixed():
    a = random_adapter(SHAPES, r=4, alpha=8, seed=1)
    b = random_adapter({k: SHAPES[k] for k in ("layers.0.q", "layers.1.q")}, r=2, alpha=16, seed=2, rslora=True)
    c = random_adapter({"layers.0.v": SHAPES["layers.0.v"]}, r=3, alpha=3, seed=3)
    return [a, b, c]


def test_linear_equals_dense_sum_mixed_ranks_disjoint_modules_negative_weights():
    adapters, weights = _mixed(), [0.7, -1.3, 2.0]
    merged, report = compose(adapters, weights, method="linear")
    oracle = _oracle_sum(adapters, weights)
    got = dense_delta(merged)
    assert set(got) == set(oracle)
    for n in oracle:
        torch.testing.assert_close(got[n], oracle[n], rtol=1e-5, atol=1e-6)
    assert report.exact_rank == 4 + 3 and merged.rank == 7 and not report.refactored  # layers.0.v: a + c
    # every module of the result has one uniform rank, padded with exact zeros
    assert {t.shape[0] for k, t in merged.tensors.items() if k.endswith("lora_A.weight")} == {7}


def test_linear_never_adds_cross_terms():
    """Averaging A and B separately gives Σ_i Σ_j B_i A_j; the exact sum must differ from that."""
    a, b = random_adapter(SHAPES, r=4, seed=5), random_adapter(SHAPES, r=4, seed=6)
    merged, _ = compose([a, b], [0.5, 0.5], method="linear")
    ma, mb = a.modules()["layers.0.q"], b.modules()["layers.0.q"]
    cross = (0.5 * ma.scaling * ma.B + 0.5 * mb.scaling * mb.B) @ (0.5 * ma.A + 0.5 * mb.A) * 2  # naive avg of factors
    exact = _oracle_sum([a, b], [0.5, 0.5])["layers.0.q"]
    assert (cross.double() - exact).abs().max() > 1e-3
    torch.testing.assert_close(dense_delta(merged)["layers.0.q"], exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_svd_equals_truncated_dense_svd(k):
    adapters, weights = _mixed(), [1.0, 0.5, -0.25]
    merged, _ = compose(adapters, weights, method="svd", rank=k)
    oracle = _oracle_sum(adapters, weights)
    got = dense_delta(merged)
    for n, d in oracle.items():
        U, S, Vh = torch.linalg.svd(d)
        kk = min(k, int((S > 1e-10).sum()))
        best = (U[:, :kk] * S[:kk]) @ Vh[:kk]
        torch.testing.assert_close(got[n], best, rtol=1e-4, atol=1e-5)
        # and Eckart–Young: the error is the tail of the singular values
        err = torch.linalg.matrix_norm(got[n] - d) ** 2
        assert float(err) == pytest.approx(float((S[kk:] ** 2).sum()), rel=1e-3, abs=1e-8)
    assert merged.rank == k


def test_svd_at_full_rank_is_exact():
    adapters, weights = _mixed(), [1.0, 1.0, 1.0]
    merged, _ = compose(adapters, weights, method="svd", rank=64)
    oracle = _oracle_sum(adapters, weights)
    for n, d in dense_delta(merged).items():
        torch.testing.assert_close(d, oracle[n], rtol=1e-4, atol=1e-6)


def test_refactor_to_engine_max_rank_reports_error():
    adapters = _mixed()
    merged, report = compose(adapters, [1, 1, 1], method="linear", max_rank=2)
    assert merged.rank == 2 and report.refactored and report.exact_rank == 7
    oracle = _oracle_sum(adapters, [1, 1, 1])
    got = dense_delta(merged)
    err = sum(float(torch.linalg.matrix_norm(got[n] - oracle[n]) ** 2) for n in oracle)
    tot = sum(float(torch.linalg.matrix_norm(oracle[n]) ** 2) for n in oracle)
    assert report.relative_error == pytest.approx((err / tot) ** 0.5, rel=1e-3)
    assert 0 < report.relative_error < 1


def test_trace_formula_matches_dense_error():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 12, generator=g), torch.randn(9, 5, generator=g)
    A2, B2 = truncate(A, B, 2)
    dense = float(torch.linalg.matrix_norm(B.double() @ A.double() - B2.double() @ A2.double()) ** 2)
    assert frobenius_error_sq(A, B, A2, B2) == pytest.approx(dense, rel=1e-6)


def test_registry_has_metadata_and_refuses_duplicates():
    from composer.registry import merge_method

    for m in METHODS.values():
        assert m.reference and m.description and m.space in ("factors", "dense")
    with pytest.raises(ValueError, match="already registered"):
        merge_method("linear", reference="x", space="factors", description="x")(lambda factors, rank: factors[0])


def test_nonfinite_result_is_refused():
    from composer.errors import CompositionError

    bad = random_adapter(SHAPES, r=2, seed=9)
    bad.tensors[next(iter(bad.tensors))][0, 0] = float("inf")
    with pytest.raises(CompositionError):
        compose([bad], [1.0], method="linear")
