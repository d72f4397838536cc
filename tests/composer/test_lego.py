"""LoRA-LEGO on adapters built from a shared set of rank-1 units: clustering finds the units."""

import pytest
import torch

from lora.adapter import LoraAdapter
from composer import compose
from tests.helpers import dense_delta

D_OUT, D_IN, UNITS = 32, 24, 6
MODULE = "model.layers.0.self_attn.q_proj"


def _library(noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    units_a = torch.randn(UNITS, D_IN, generator=g)
    units_b = torch.randn(UNITS, D_OUT, generator=g)
    picks = [[0, 1, 2], [2, 3, 4], [4, 5, 0], [1, 3, 5]]
    adapters = []
    for pick in picks:
        A, B = [], []
        for u in pick:
            c = float(torch.empty(1).uniform_(0.3, 3.0, generator=g))  # (c·a, b/c): the same unit
            s = -1.0 if torch.rand(1, generator=g) < 0.5 else 1.0  # (−a, −b): the same unit
            A.append(s * c * (units_a[u] + noise * torch.randn(D_IN, generator=g)))
            B.append(s / c * (units_b[u] + noise * torch.randn(D_OUT, generator=g)))
        A, B = torch.stack(A), torch.stack(B, 1)
        cfg = {"peft_type": "LORA", "r": 3, "lora_alpha": 3, "target_modules": ["q_proj"]}
        adapters.append(LoraAdapter(cfg, {f"base_model.model.{MODULE}.lora_A.weight": A,
                                          f"base_model.model.{MODULE}.lora_B.weight": B}))
    return adapters, units_a, units_b


def _rel_err(merged, adapters):
    exact = sum(dense_delta(a)[MODULE] for a in adapters)
    return float(torch.linalg.matrix_norm(dense_delta(merged)[MODULE] - exact) / torch.linalg.matrix_norm(exact))


def test_lego_recovers_shared_units():
    adapters, units_a, units_b = _library(noise=0.02)
    merged, _ = compose(adapters, [1.0] * 4, method="lego", params={"centroid": "svd"}, rank=UNITS)
    m = merged.modules()[MODULE]
    # each recovered unit points along one ground-truth unit (|cos| ≈ 1 for both a and b)
    cos_a = (torch.nn.functional.normalize(m.A, dim=1) @ torch.nn.functional.normalize(units_a, dim=1).T).abs()
    cos_b = (torch.nn.functional.normalize(m.B.T, dim=1) @ torch.nn.functional.normalize(units_b, dim=1).T).abs()
    assert sorted(cos_a.argmax(1).tolist()) == list(range(UNITS))
    assert float(cos_a.max(1).values.min()) > 0.99 and float(cos_b.max(1).values.min()) > 0.99
    assert _rel_err(merged, adapters) < 0.05
    # the default 'mean' centroid finds the same units (it averages copies rather than summing them)
    mean, _ = compose(adapters, [1.0] * 4, method="lego", rank=UNITS)
    cos = (torch.nn.functional.normalize(mean.modules()[MODULE].A, dim=1) @ torch.nn.functional.normalize(units_a, dim=1).T).abs()
    assert float(cos.max(1).values.min()) > 0.99


def test_lego_error_is_reported_against_svd_at_the_same_rank(capsys):
    """svd is Frobenius-optimal at rank K, so it bounds lego from below; on shared units lego is close."""
    adapters, _, _ = _library(noise=0.05, seed=1)
    errs = {}
    for method, params in [("svd", {}), ("lego", {"centroid": "svd"}), ("lego", {"centroid": "mean"}),
                           ("lego", {"centroid": "mean", "output_reweight": True})]:
        merged, _ = compose(adapters, [1.0] * 4, method=method, params=params, rank=UNITS)
        errs[f"{method} {params}"] = _rel_err(merged, adapters)
    print(errs)
    assert errs["svd {}"] <= errs["lego {'centroid': 'svd'}"] + 1e-6
    assert errs["lego {'centroid': 'svd'}"] < 0.1
    # the mean centroid averages copies instead of summing them: it cannot reproduce a sum
    assert errs["lego {'centroid': 'mean'}"] > errs["lego {'centroid': 'svd'}"]


def test_lego_exact_when_units_fit():
    adapters, _, _ = _library(noise=0.1)
    merged, _ = compose(adapters[:2], [1.0, -0.5], method="lego", rank=6)
    exact = dense_delta(adapters[0])[MODULE] - 0.5 * dense_delta(adapters[1])[MODULE]
    torch.testing.assert_close(dense_delta(merged)[MODULE], exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_lego_is_deterministic(seed):
    adapters, _, _ = _library(noise=0.05)
    a, _ = compose(adapters, [1.0] * 4, method="lego", params={"seed": seed}, rank=4)
    b, _ = compose(adapters, [1.0] * 4, method="lego", params={"seed": seed}, rank=4)
    assert a.weights_bytes() == b.weights_bytes()
