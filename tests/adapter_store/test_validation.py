"""Validation at the door, against the real base model's module shapes."""

import json

import pytest
import torch
from safetensors.torch import save

from lora.adapter import CONFIG_FILE, WEIGHTS_FILE, factor_key
from lora.errors import AdapterValidationError
from adapter_store.validation import validate_files
from tests.helpers import random_adapter

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.3.self_attn.v_proj"


def _files(adapter):
    return {CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: adapter.weights_bytes()}


def test_good_adapter_passes(base_spec):
    shapes = {Q: base_spec.shapes[Q], V: base_spec.shapes[V]}
    adapter = random_adapter(shapes, r=4)
    got = validate_files(_files(adapter), base_spec, max_rank=64, name="good-skill_1.0")
    assert got.weights_bytes() == adapter.weights_bytes()


def test_an_upload_is_parsed_once_and_kept_as_it_came(base_spec, monkeypatch):
    """The weights are read once (the checks and the adapter share the tensors) and the adapter keeps the bytes
    uploaded, not a re-encoding; an adapter in memory is checked without being serialised."""
    from adapter_store import validation
    from lora.adapter import LoraAdapter

    adapter = random_adapter({Q: base_spec.shapes[Q], V: base_spec.shapes[V]}, r=4)
    files = _files(adapter)
    loads, real = [], validation.st_load
    monkeypatch.setattr(validation, "st_load", lambda data: loads.append(len(data)) or real(data))
    monkeypatch.setattr(LoraAdapter, "from_bytes", classmethod(lambda *a: pytest.fail("parsed a second time")))
    got = validate_files(files, base_spec, max_rank=64, name="once")
    assert loads == [len(files[WEIGHTS_FILE])] and got.weights_bytes() is files[WEIGHTS_FILE]
    assert torch.equal(got.tensors[factor_key(Q, "A")], adapter.tensors[factor_key(Q, "A")])
    monkeypatch.setattr(LoraAdapter, "weights_bytes", lambda self: pytest.fail("serialised to be checked"))
    validation.validate_adapter(got, base_spec, max_rank=64, name="once")
    with pytest.raises(AdapterValidationError, match="rank r=4 exceeds the maximum 2"):
        validation.validate_adapter(got, base_spec, max_rank=2)


def test_every_problem_is_reported_at_once(base_spec):
    d_out, d_in = base_spec.shapes[Q]
    tensors = {
        factor_key(Q, "A"): torch.randn(4, d_in + 1),  # wrong input size
        factor_key(Q, "B"): torch.full((d_out, 4), float("nan")),  # NaN
        factor_key("model.layers.0.self_attn.nope_proj", "A"): torch.randn(4, d_in),  # no such module
        factor_key(V, "A"): torch.randn(4, d_in),  # B missing
        "some.other.tensor": torch.zeros(2),  # not a LoRA factor
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True,
              "modules_to_save": ["lm_head"]}
    files = {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: save(tensors), "training_args.bin": b"\x80"}
    with pytest.raises(AdapterValidationError) as exc:
        validate_files(files, base_spec, max_rank=64, name="bad name!")
    problems = "\n".join(exc.value.problems)
    for expected in ["name 'bad name!'", "pickle", "use_dora", "modules_to_save", "input size", "NaN",
                     "nope_proj", "lora_B is missing", "not a LoRA factor"]:
        assert expected in problems, expected
    assert len(exc.value.problems) >= 9


def test_rank_limit_config_and_missing_files(base_spec):
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=16)
    with pytest.raises(AdapterValidationError, match="exceeds the maximum 8"):
        validate_files(_files(adapter), base_spec, max_rank=8)
    with pytest.raises(AdapterValidationError) as exc:
        validate_files({"adapter_model.bin": b"x"}, base_spec, max_rank=8)
    assert any("adapter_config.json is missing" in p for p in exc.value.problems)
    assert any("adapter_model.safetensors is missing" in p for p in exc.value.problems)
    assert any("pickle" in p for p in exc.value.problems)
    with pytest.raises(AdapterValidationError, match="not a readable safetensors"):
        validate_files({CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: b"garbage"}, base_spec, max_rank=64)


def test_config_rank_must_match_tensors(base_spec):
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=4)
    adapter.config["r"] = 8
    with pytest.raises(AdapterValidationError, match="differs from the config's rank 8"):
        validate_files(_files(adapter), base_spec, max_rank=64)


@pytest.mark.parametrize("name", ["auto", "", "a/b/c", "/b", "a/", "a/download", "x" * 65, "-lead", "with space", "SmolLM2-135M-Instruct", "auto\n", "ok\n"])
def test_bad_names(base_spec, name):
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=2)
    with pytest.raises(AdapterValidationError, match="name"):
        validate_files(_files(adapter), base_spec, max_rank=64, name=name)


def test_rank_and_alpha_patterns_are_checked_at_upload(base_spec):
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=4)
    config = {**adapter.config, "rank_pattern": {"(": 4, "q_proj": "8", "x" * 300: 4},
              "alpha_pattern": {"v_proj": float("inf")}, "lora_alpha": float("nan")}
    files = {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: adapter.weights_bytes()}
    with pytest.raises(AdapterValidationError) as e:
        validate_files(files, base_spec, max_rank=64)
    text = "\n".join(e.value.problems)
    assert "rank_pattern pattern '(' is not accepted" in text and "missing )" in text
    assert "rank_pattern['q_proj'] must be an integer rank" in text and "longer than 256" in text
    assert "alpha_pattern['v_proj'] must be a finite number" in text and "lora_alpha must be a finite number" in text


def test_a_pattern_that_backtracks_exponentially_is_matched_in_linear_time(base_spec):
    import re
    import time

    from lora.adapter import config_rank

    evil = "(.*.*.*.*)*z"  # Python's re needs minutes for this on a module name without a 'z'
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=4)
    config = {**adapter.config, "rank_pattern": {evil: 2}}
    t0 = time.monotonic()
    got = validate_files({CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: adapter.weights_bytes()}, base_spec, max_rank=64)
    assert config_rank(got.config, Q) == 4 and time.monotonic() - t0 < 1.0
    assert config_rank({**config, "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2}}, Q) == 2  # PEFT's suffix rule
    assert re.match(rf"(.*\.)?({evil})$", "q_proj") is None  # (what Python makes of it on a short name)


def test_a_lora_on_the_embeddings_is_refused(base_spec):
    m = "model.embed_tokens"
    vocab, hidden = base_spec.shapes[m] if m in base_spec.shapes else (49152, 576)
    tensors = {factor_key(m, "A"): torch.zeros(1, hidden), factor_key(m, "B"): torch.zeros(vocab, 1)}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["embed_tokens"]}
    with pytest.raises(AdapterValidationError) as e:
        validate_files({CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: save(tensors)}, base_spec, max_rank=64)
    assert any("embeddings" in p for p in e.value.problems)


def test_patterns_whose_order_would_matter_are_refused(base_spec):
    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=4)
    for config in ({**adapter.config, "alpha_pattern": {"q_proj": 32, ".*_proj": 4}},
                   {**adapter.config, "rank_pattern": {"self_attn\\.q_proj": 4, "q_proj": 8}}):
        with pytest.raises(AdapterValidationError) as e:
            validate_files({CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: adapter.weights_bytes()}, base_spec, max_rank=64)
        assert any("several" in p for p in e.value.problems), e.value.problems
    same = {**adapter.config, "alpha_pattern": {"q_proj": 4, ".*_proj": 4}}  # agreeing patterns are fine
    validate_files({CONFIG_FILE: json.dumps(same).encode(), WEIGHTS_FILE: adapter.weights_bytes()}, base_spec, max_rank=64)


def test_tensors_are_counted_from_the_header_before_anything_is_loaded(base_spec):
    """The exact file seen: 100,000 one-value tensors once took 2.3 s and came back as a 9 MB error."""
    import io
    import tarfile
    import time
    from pathlib import Path

    corpus = Path(__file__).resolve().parents[1] / "data" / "hostile" / "safetensors" / "many_tensors.tar.xz"
    with tarfile.open(fileobj=io.BytesIO(corpus.read_bytes()), mode="r:xz") as t:
        files = {m.name: t.extractfile(m).read() for m in t}
    t0 = time.monotonic()
    with pytest.raises(AdapterValidationError) as e:
        validate_files(files, base_spec, max_rank=64)
    assert time.monotonic() - t0 < 0.2
    assert e.value.problems == [f"{WEIGHTS_FILE} holds 100,000 tensors; at most 4,096 are accepted "
                                "(setting MOSAIC_MAX_TENSORS)"]
    few = {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: save({f"x{i}": torch.zeros(1) for i in range(11)})}
    with pytest.raises(AdapterValidationError, match="holds 11 tensors; at most 10"):
        validate_files(few, base_spec, max_rank=64, max_tensors=10)


def test_a_header_larger_than_the_tensors_allowed_need_is_refused(base_spec):
    from safetensors.torch import save as save_with_metadata

    adapter = random_adapter({Q: base_spec.shapes[Q]}, r=2)
    padded = save_with_metadata(adapter.tensors, metadata={"filler": "x" * 100_000})
    with pytest.raises(AdapterValidationError, match="has a header of .* bytes; 2 tensors .*MOSAIC_MAX_TENSORS"):
        validate_files({CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: padded}, base_spec, max_rank=64, max_tensors=2)
    validate_files({CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: adapter.weights_bytes()}, base_spec, max_rank=64,
                   max_tensors=2)  # the same tensors with a plain header: accepted at exactly the limit


def test_an_error_names_at_most_20_problems(base_spec):
    tensors = {f"not.a.factor.{i}.{'n' * 1000}": torch.zeros(1) for i in range(30)}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}
    with pytest.raises(AdapterValidationError) as e:
        validate_files({CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: save(tensors)}, base_spec, max_rank=64)
    assert len(e.value.problems) == 30 and e.value.message.endswith("; and 10 more")
    assert e.value.message.startswith("adapter refused (30 problems): ") and len(e.value.message) < 20 * 310


def test_text_limits_name_every_problem_and_the_first_field():
    from lora.errors import InvalidRequestError
    from adapter_store.validation import TextLimits, check_text

    limits = TextLimits(examples=2, example_chars=5, description_chars=10, tags=1, tag_chars=3)
    check_text(limits, description="d" * 10, examples=["12345", "ok"], tags=["abc"])  # at every limit
    with pytest.raises(InvalidRequestError) as e:
        check_text(limits, description="d" * 11, examples=["123456", "a", "b"], tags=["abcd", "e"])
    assert e.value.param == "examples"
    for setting in ("MOSAIC_MAX_EXAMPLES_PER_SKILL", "MOSAIC_MAX_EXAMPLE_CHARS", "MOSAIC_MAX_DESCRIPTION_CHARS",
                    "MOSAIC_MAX_TAGS", "MOSAIC_MAX_TAG_CHARS"):
        assert setting in e.value.message, setting
    with pytest.raises(InvalidRequestError) as e:
        check_text(limits, tags=["abcd"])
    assert e.value.param == "tags"
