"""The shared LoRA factor math, checked against dense float64 ΔW (the oracle), never against itself."""

from __future__ import annotations

import pytest
import torch

from lora.factors import (
    canonical_units,
    concat,
    frobenius_error_sq,
    frobenius_sq,
    inner,
    split_svd,
    truncate,
    unit_rows,
)
from tests.helpers import random_adapter

SHAPES = {f"model.layers.{i}.self_attn.{p}": (48, 32) for i in range(2) for p in ("q_proj", "v_proj")}


def _dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return B.double() @ A.double()


@pytest.mark.parametrize("sign_from", ["a", "both"])
def test_canonical_units_keep_delta_and_balance(sign_from):
    for m in random_adapter(SHAPES, 4, seed=1).modules().values():
        a, b = canonical_units(*unit_rows(m.A, m.B, m.scaling), sign_from=sign_from)
        assert torch.allclose(b.T @ a, m.scaling * _dense(m.A, m.B), atol=1e-12)  # same ΔW
        assert torch.allclose(a.norm(dim=1), b.norm(dim=1))  # balanced
        pivot = a if sign_from == "a" else torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)], 1)
        assert (pivot.gather(1, pivot.abs().argmax(dim=1, keepdim=True)) > 0).all()
        # a unit rescaled (c·a, b/c) or negated has the same canonical form
        a2, b2 = canonical_units(-3.0 * a, -b / 3.0, sign_from=sign_from)
        assert torch.allclose(a2, a) and torch.allclose(b2, b)


def test_canonical_units_leave_zero_units_alone():
    a = torch.tensor([[0.0, 0.0], [1.0, -4.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    ca, cb = canonical_units(a, b)
    assert torch.equal(ca[0], a[0]) and torch.equal(cb[0], b[0])
    assert torch.allclose(cb.T @ ca, b.T @ a)


def test_norms_and_errors_match_dense_oracle():
    x, y = random_adapter(SHAPES, 4, seed=1).modules(), random_adapter(SHAPES, 3, seed=2).modules()
    for name, m in x.items():
        o = y[name]
        want, other = _dense(m.A, m.B), _dense(o.A, o.B)
        assert frobenius_sq(m.A, m.B) == pytest.approx(float(want.norm() ** 2), rel=1e-12)
        assert inner(m.A, m.B, o.A, o.B) == pytest.approx(float((want * other).sum()), rel=1e-9, abs=1e-15)
        err = float((want - other).norm() ** 2)
        assert frobenius_error_sq(m.A, m.B, o.A, o.B) == pytest.approx(err, rel=1e-9)
        assert frobenius_error_sq(m.A, m.B, o.A, o.B, norm_sq=frobenius_sq(m.A, m.B)) == pytest.approx(err, rel=1e-9)
        assert frobenius_error_sq(m.A, m.B, m.A, m.B) == pytest.approx(0.0, abs=1e-12)


def test_concat_is_the_sum_and_truncate_is_eckart_young():
    x, y = random_adapter(SHAPES, 4, seed=3).modules(), random_adapter(SHAPES, 5, seed=4).modules()
    for name, m in x.items():
        A, B = concat([(m.A, m.B), (y[name].A, y[name].B)])
        total = _dense(m.A, m.B) + _dense(y[name].A, y[name].B)
        assert torch.allclose(_dense(A, B), total, atol=1e-6)
        U, S, Vh = torch.linalg.svd(total)
        for k in (1, 3, 9, 20):  # 20 > rank: the exact sum
            A2, B2 = truncate(A, B, k)
            assert A2.shape[0] == min(k, 9) and A2.dtype == torch.float32
            best = _dense(*split_svd(U, S, Vh, k))
            torch.testing.assert_close(_dense(A2, B2), best, rtol=1e-4, atol=1e-6)
