"""One contract every registered merge method keeps (peft's testing_common pattern)."""

import pytest
import torch

from composer import METHODS, compose
from tests.helpers import random_adapter

SHAPES = {"model.layers.0.q": (24, 16), "model.layers.0.v": (8, 16), "model.layers.1.q": (24, 16)}


def _inputs(method: str = "linear"):
    a = random_adapter(SHAPES, r=4, alpha=8, seed=1)
    b = random_adapter({k: SHAPES[k] for k in ("model.layers.0.q", "model.layers.1.q")}, r=2, alpha=16, seed=2, rslora=True)
    c = random_adapter({"model.layers.0.v": SHAPES["model.layers.0.v"]}, r=3, alpha=3, seed=3)
    k = METHODS[method].max_inputs or 3  # a method for at most two skills gets two (modules missing in one still appear)
    return [a, b, c][:k], [0.7, -1.3, 2.0][:k]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_contract(method):
    adapters, weights = _inputs(method)
    merged, report = compose(adapters, weights, method=method, rank=3)
    again, _ = compose(*_inputs(method), method=method, rank=3)
    # shapes: the union of modules, each with its base shapes, one uniform rank ≤ the target
    assert merged.module_names() == sorted(SHAPES)
    for name, m in merged.modules().items():
        d_out, d_in = SHAPES[name]
        assert m.A.shape == (merged.rank, d_in) and m.B.shape == (d_out, merged.rank)
        assert torch.isfinite(m.A).all() and torch.isfinite(m.B).all()
    assert merged.rank <= 3 and report.rank == merged.rank
    # determinism: the same inputs give the same bytes (hence the same content hash)
    assert merged.weights_bytes() == again.weights_bytes()
    # and the result is not trivially zero
    assert any(float(m.B.abs().sum()) > 0 for m in merged.modules().values())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_auto_rank_respects_the_cap(method):
    adapters, weights = _inputs(method)
    merged, _ = compose(adapters, weights, method=method, rank=None, max_rank=5)
    assert 1 <= merged.rank <= 5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_single_adapter_of_low_rank_is_kept(method):
    """One rank-2 adapter with weight 1 composed at rank 2: exact for every factor method; dense
    methods keep their defining operation (pruning) but stay close and rank 2."""
    a = random_adapter(SHAPES, r=2, seed=4)
    merged, _ = compose([a], [1.0], method=method, rank=2)
    assert merged.rank == 2
    if METHODS[method].space == "factors":
        for n, m in a.modules().items():
            got = merged.modules()[n]
            torch.testing.assert_close(got.B @ got.A, m.scaling * m.B @ m.A, rtol=1e-4, atol=1e-6)


def test_unknown_parameters_and_bad_values_are_refused():
    adapters, weights = _inputs()
    with pytest.raises(ValueError, match="no parameter"):
        compose(adapters, weights, method="ties", params={"densty": 0.3})
    with pytest.raises(ValueError, match="within"):
        compose(adapters, weights, method="ties", params={"density": 1.5})
    for bad in ("nan", float("nan"), float("inf")):  # NaN would pass every bound check
        with pytest.raises(ValueError, match="finite"):
            compose(adapters, weights, method="ties", params={"density": bad})
    with pytest.raises(ValueError, match="one of"):
        compose(adapters, weights, method="ties", params={"majority_sign_method": "vote"})


def test_the_composition_key_names_the_engine_rank_limit_it_was_cut_to():
    from composer.spec import Composition

    c = Composition(skills=("a", "b"))
    ids = ["1" * 64, "2" * 64]
    assert len({c.content_key(ids), c.content_key(ids, 32), c.content_key(ids, 64)}) == 3
    assert c.content_key(ids, 32) == Composition(skills=("x", "y")).content_key(ids, 32)  # names never enter


@pytest.mark.parametrize("method,params", [("lego", {"n_init": 10**6}), ("dare_ties", {"seed": 2**64}), ("dare_linear", {"seed": -1}),
                                           ("psec", {"top_k": 10**9}), ("consensus", {"k": 10**9}),
                                           ("layer_swap", {"end": 10**9})])
def test_merge_parameters_are_bounded(method, params):
    from pydantic import ValidationError

    from composer.spec import Composition

    with pytest.raises(ValidationError, match="must be within"):
        Composition(skills=("a", "b"), method=method, params=params, rank=4)
