"""Fusion (per skill, layer or module weights) against an independent dense float64 oracle, its JSON form, and
bad input."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from lora.adapter import factor_key
from lora.errors import InvalidRequestError
from composer import FusionWeights, compose, fuse
from composer.fusion import group_of, groups_for
from tests.helpers import dense_delta, random_adapter

LAYERS = 3
SHAPES = {f"model.layers.{layer}.self_attn.{m}": s
          for layer in range(LAYERS) for m, s in (("q_proj", (24, 16)), ("v_proj", (8, 16)))}
SHAPES["lm_head"] = (10, 16)  # outside any numbered layer: column "*" per layer


def _skills():
    """Three skills of different ranks and scalings: plain alpha/r, rslora alpha/√r, and an alpha_pattern."""
    a = random_adapter(SHAPES, r=4, alpha=8, seed=1)
    b = random_adapter(SHAPES, r=2, alpha=16, seed=2, rslora=True)
    c = random_adapter(SHAPES, r=3, alpha=3, seed=3)
    c.config["alpha_pattern"] = {"v_proj": 12}
    return [a, b, c]


def _scale(adapter, module: str) -> float:
    """The oracle's own reading of PEFT's scaling rules (not adapter_store's)."""
    cfg = adapter.config
    patterned = module.endswith("v_proj") and cfg.get("alpha_pattern")
    alpha = cfg["alpha_pattern"]["v_proj"] if patterned else cfg["lora_alpha"]
    return alpha / math.sqrt(cfg["r"]) if cfg.get("use_rslora") else alpha / cfg["r"]


def _oracle(adapters, w) -> dict[str, torch.Tensor]:
    """Σ_i w(i, module) · s_i B_i A_i, dense in float64."""
    out: dict[str, torch.Tensor] = {}
    for i, ad in enumerate(adapters):
        for name in SHAPES:
            if factor_key(name, "A") not in ad.tensors:
                continue
            A, B = ad.tensors[factor_key(name, "A")].double(), ad.tensors[factor_key(name, "B")].double()
            out[name] = out.get(name, 0) + w(i, name) * _scale(ad, name) * (B @ A)
    return out


def _random_weights(granularity, skills, modules, seed=0) -> FusionWeights:
    start = FusionWeights.broadcast(granularity, skills, modules)
    g = torch.Generator().manual_seed(seed)
    return start.with_table(torch.randn(len(skills), len(start.groups), generator=g, dtype=torch.float64))


@pytest.mark.parametrize("granularity,columns", [("skill", 1), ("layer", LAYERS + 1), ("module", len(SHAPES))])
def test_fused_delta_equals_the_weighted_dense_sum(granularity, columns):
    adapters = _skills()
    weights = _random_weights(granularity, ["a", "b", "c"], list(SHAPES))
    assert len(weights.groups) == columns
    fused = fuse(adapters, weights)
    got, oracle = dense_delta(fused), _oracle(adapters, weights.weight)
    assert set(got) == set(oracle) == set(SHAPES)
    for name in oracle:
        torch.testing.assert_close(got[name], oracle[name], rtol=1e-5, atol=1e-6)
    # one PEFT adapter as composer's exact linear builds it: rank Σ r_i, scaling 1, no patterns
    assert fused.rank == 4 + 2 + 3 and fused.config["r"] == fused.config["lora_alpha"] == 9
    assert fused.is_engine_native() and fused.config["base_model_name_or_path"] == "tiny"
    assert all(t.dtype == torch.float32 for t in fused.tensors.values())


def test_per_layer_weights_reach_each_layer_and_skill_granularity_is_linear():
    adapters = _skills()
    modules = list(SHAPES)
    # per layer: skill a on layer 0 only, skill b on layers 1 and 2, c nowhere: each module is one skill's ΔW
    layer = FusionWeights(granularity="layer", skills=("a", "b", "c"), groups=("0", "1", "2", "*"),
                          table=((1, 0, 0, 0.5), (0, 1, 1, 0), (0, 0, 0, 0)))
    got = dense_delta(fuse(adapters, layer))
    single = [dense_delta(a) for a in adapters]
    for name in modules:
        if name == "lm_head":
            want = 0.5 * single[0][name]
        else:
            want = single[0][name] if ".layers.0." in name else single[1][name]
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    # per skill: the same adapter as composer's exact linear method with those weights
    skill = FusionWeights.broadcast("skill", ["a", "b", "c"], modules, [0.7, -1.3, 2.0])
    linear, _ = compose(adapters, [0.7, -1.3, 2.0], method="linear")
    for name, d in dense_delta(linear).items():
        torch.testing.assert_close(dense_delta(fuse(adapters, skill))[name], d, rtol=1e-5, atol=1e-6)


def test_a_skill_without_a_module_adds_nothing_there():
    """Modules are the union of the skills' modules; a skill lacking one contributes zero there (as compose does),
    whatever its weight, and the module's rank is that of the skills that have it (zero-padded to the adapter's)."""
    a = random_adapter(SHAPES, r=4, alpha=8, seed=1)
    only_q = {n: s for n, s in SHAPES.items() if n.endswith("q_proj")}
    b = random_adapter(only_q, r=2, alpha=4, seed=2)
    weights = _random_weights("module", ["a", "b"], list(SHAPES), seed=3)
    fused = fuse([a, b], weights)
    got, oracle = dense_delta(fused), _oracle([a, b], weights.weight)
    for name in SHAPES:
        torch.testing.assert_close(got[name], oracle[name], rtol=1e-5, atol=1e-6)
    v = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(got[v], weights.weight(0, v) * dense_delta(a)[v], rtol=1e-5, atol=1e-6)
    assert fused.rank == 6 and not fused.tensors[factor_key(v, "A")][4:].any()  # v: a's 4 ranks, then zeros


def test_json_round_trip():
    weights = _random_weights("layer", ["json@2", "upper@1"], list(SHAPES), seed=4)
    record = weights.model_dump(mode="json")
    assert record["granularity"] == "layer" and record["groups"] == ["0", "1", "2", "*"]
    assert len(record["table"]) == 2 and all(len(row) == 4 for row in record["table"])
    again = FusionWeights.model_validate(record)
    assert again == weights and FusionWeights.model_validate_json(weights.model_dump_json()) == weights
    assert again.weight(1, "model.layers.2.self_attn.v_proj") == weights.table[1][2]
    assert again.column("lm_head") == 3


def test_groups():
    assert group_of("skill", "model.layers.7.mlp.down_proj") == "*"
    assert group_of("layer", "model.layers.7.mlp.down_proj") == "7" and group_of("layer", "lm_head") == "*"
    assert group_of("module", "lm_head") == "lm_head"
    modules = ["model.layers.10.q", "lm_head", "model.layers.2.q", "model.layers.10.v"]
    assert groups_for("layer", modules) == ("2", "10", "*")


def test_bad_weights_are_refused_with_every_problem():
    with pytest.raises(pydantic.ValidationError, match="granularity"):
        FusionWeights(granularity="row", skills=("a",), groups=("*",), table=((1.0,),))
    with pytest.raises(pydantic.ValidationError) as err:
        FusionWeights(granularity="layer", skills=("a", "b"), groups=("0", "x"), table=((1.0, 2.0),))
    assert "'x'" in str(err.value) and "2 skills" in str(err.value)  # both problems, one error
    with pytest.raises(pydantic.ValidationError, match="one weight per column"):
        FusionWeights(granularity="layer", skills=("a", "b"), groups=("0", "1"), table=((1.0, 2.0), (1.0,)))
    with pytest.raises(pydantic.ValidationError, match="finite"):
        FusionWeights(granularity="skill", skills=("a",), groups=("*",), table=((float("nan"),),))
    with pytest.raises(pydantic.ValidationError, match="one column"):
        FusionWeights(granularity="skill", skills=("a",), groups=("0",), table=((1.0,),))
    with pytest.raises(pydantic.ValidationError, match="distinct"):
        FusionWeights(granularity="module", skills=("a",), groups=("m", "m"), table=((1.0, 2.0),))
    with pytest.raises(InvalidRequestError, match="2 skills but 3 weights"):
        FusionWeights.broadcast("skill", ["a", "b"], list(SHAPES), [1.0, 2.0, 3.0])


def test_weights_that_do_not_fit_the_adapters_are_refused():
    adapters = _skills()
    weights = FusionWeights.broadcast("layer", ["a", "b", "c"], list(SHAPES))
    with pytest.raises(InvalidRequestError, match="3 skills in the weights but 2 adapters"):
        fuse(adapters[:2], weights)
    # layers 0-1 only: layer 2 has no weights; and a column for layer 5, which no module has: one error for both
    short = FusionWeights(granularity="layer", skills=("a", "b", "c"), groups=("0", "1", "5", "*"),
                          table=((1.0,) * 4,) * 3)
    with pytest.raises(InvalidRequestError, match=r"no layer weights for \['2'\].*\['5'\], which none") as err:
        fuse(adapters, short)
    assert err.value.param == "weights"
    with pytest.raises(InvalidRequestError, match="no column for lm_head"):
        FusionWeights.broadcast("layer", ["a"], ["model.layers.0.q"]).column("lm_head")
