"""Hypothesis against validation at the door: whatever config or safetensors header an upload carries,
validation answers with the list of problems (AdapterValidationError) or an adapter that every later
step can use (its scalings, its content id) — never another exception."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from lora.errors import AdapterValidationError
from adapter_store.validation import validate_files
from tests.helpers import random_adapter

Q = "model.layers.0.self_attn.q_proj"
PEFT_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora",
             "modules_to_save", "bias", "fan_in_fan_out", "lora_dropout", "base_model_name_or_path", "task_type",
             "layers_to_transform", "init_lora_weights"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["LORA", "q_proj", "(", ".*", "(a+)+$", "[", "\\", "none"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=12)
patterns = st.dictionaries(st.one_of(st.text(max_size=20), st.sampled_from(["q_proj", "layers\\.0\\..*", "(", "(.*)*x", "a{1000}"])),
                           json_values, max_size=4)
configs = st.fixed_dictionaries(
    {},
    optional={"peft_type": st.one_of(st.just("LORA"), json_values), "r": st.one_of(st.integers(-3, 80), json_values),
              "lora_alpha": st.one_of(st.floats(allow_nan=True), st.integers(-5, 100), json_values),
              "target_modules": st.one_of(st.just(["q_proj"]), json_values), "use_rslora": json_values,
              "rank_pattern": st.one_of(patterns, json_values), "alpha_pattern": st.one_of(patterns, json_values)},
).flatmap(lambda d: st.dictionaries(st.sampled_from(PEFT_KEYS) | st.text(max_size=8), json_values, max_size=3).map(lambda extra: {**extra, **d}))


VALID = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
# a valid config with a key or two changed: most of these pass, so what follows validation runs too
near_valid = st.dictionaries(
    st.sampled_from(["rank_pattern", "alpha_pattern", "use_rslora", "lora_alpha", "target_modules", "lora_dropout"]),
    st.one_of(patterns, st.dictionaries(st.sampled_from(["q_proj", "self_attn\\.q_proj", "layers\\.0\\..*", "v_proj"]),
                                        st.one_of(st.integers(1, 64), st.floats(-10, 10)), max_size=2),
              st.booleans(), st.floats(0.1, 100)),
    max_size=2).map(lambda d: {**VALID, **d})


def _check(files, base_spec) -> None:
    try:
        adapter = validate_files(files, base_spec, max_rank=64)
    except AdapterValidationError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        return
    for module in adapter.modules().values():  # what composing and serving will compute
        assert math.isfinite(module.scaling)
    assert len(adapter.content_id()) == 64


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(config=st.one_of(configs, near_valid))
def test_any_config_is_refused_with_problems_or_usable(base_spec, config):
    weights = random_adapter({Q: base_spec.shapes[Q]}, r=4).weights_bytes()
    raw = json.dumps(config, allow_nan=True).encode()
    _check({CONFIG_FILE: raw, WEIGHTS_FILE: weights}, base_spec)


headers = st.dictionaries(
    st.one_of(st.just(f"base_model.model.{Q}.lora_A.weight"), st.just(f"base_model.model.{Q}.lora_B.weight"),
              st.just("__metadata__"), st.text(max_size=12)),
    st.one_of(st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F8_E4M3", "XX"]),
                                     "shape": st.lists(st.integers(-1, 2**40), max_size=3),
                                     "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}),
              json_values),
    max_size=3)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(header=headers, declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)), tail=st.binary(max_size=64))
def test_any_safetensors_header_is_refused_with_problems_or_usable(base_spec, header, declared, tail):
    blob = json.dumps(header).encode()
    weights = struct.pack("<Q", len(blob) if declared is None else declared) + blob + tail
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).encode()
    _check({CONFIG_FILE: config, WEIGHTS_FILE: weights}, base_spec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(alphas=st.dictionaries(st.sampled_from(["q_proj", "self_attn\\.q_proj", "layers\\.[0-9]+\\.self_attn\\..*", "(.*.*)*z"]),
                              st.floats(-100, 100, allow_nan=False), max_size=3),
       ranks=st.dictionaries(st.sampled_from(["v_proj", "(.*.*)*z", "k_proj"]), st.integers(1, 64), max_size=2),
       rslora=st.booleans())
def test_valid_patterned_configs_are_accepted_and_scaled_as_peft_says(base_spec, alphas, ranks, rslora):
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=4)
    import re

    config = {**VALID, "alpha_pattern": alphas, "rank_pattern": ranks, "use_rslora": rslora}
    files = {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: adapter.weights_bytes()}
    # PEFT's rule, by Python's re on these harmless keys: the first key the module name ends with (dot-bounded)
    hits = [v for k, v in alphas.items() if "z" not in k and re.match(rf"(.*\.)?({k})$", Q)]
    if len(set(hits)) > 1:  # which one applies would depend on the order of the keys: refused
        with pytest.raises(AdapterValidationError, match="several"):
            validate_files(files, base_spec, max_rank=64)
        return
    got = validate_files(files, base_spec, max_rank=64)
    alpha = hits[0] if hits else 8
    want = alpha / (math.sqrt(4) if rslora else 4)
    assert math.isclose(got.modules()[Q].scaling, want, rel_tol=1e-12, abs_tol=1e-12)
