"""The Redis registry: exact round trips, versions, atomic writes, deletes."""

import pytest

from adapter_store.errors import InvalidRequestError, NotFoundError
from adapter_store.registry import parse_ref
from tests.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (8, 16)}


def test_round_trip_is_bit_exact(registry):
    adapter = random_adapter(SHAPES, r=4, seed=1)
    info = registry.add("alpha", adapter, description="d", examples=["e1", "e2"], tags=["t"])
    got_info, got = registry.load("alpha")
    assert got.weights_bytes() == adapter.weights_bytes()
    assert got.config == adapter.config
    assert got_info == info
    assert info.sha256 == adapter.sha256() and info.rank == 4 and info.size == len(adapter.weights_bytes())
    assert info.target_modules == ["q_proj", "v_proj"] and info.examples == ["e1", "e2"] and info.tags == ["t"]


def test_versions_and_addressing(registry):
    a1, a2 = random_adapter(SHAPES, r=2, seed=1), random_adapter(SHAPES, r=2, seed=2)
    assert registry.add("s", a1).version == 1
    assert registry.add("s", a2).version == 2
    assert registry.info("s").sha256 == a2.sha256()
    assert registry.info("s@1").sha256 == a1.sha256()
    assert [v.version for v in registry.versions("s")] == [1, 2]
    assert registry.names() == ["s"]
    with pytest.raises(NotFoundError):
        registry.info("s@3")
    with pytest.raises(InvalidRequestError):
        registry.info("s@x")


def test_version_numbers_are_never_reused(registry):
    registry.add("s", random_adapter(SHAPES, r=2, seed=1))
    registry.add("s", random_adapter(SHAPES, r=2, seed=2))
    registry.delete("s@2")
    assert registry.info("s").version == 1
    assert registry.add("s", random_adapter(SHAPES, r=2, seed=3)).version == 3


@pytest.mark.parametrize("step", ["version-written", "pointers-written"])
def test_interrupted_write_leaves_nothing(registry, monkeypatch, step):
    registry.add("keep", random_adapter(SHAPES, r=2, seed=1))
    before = sorted(registry.r.scan_iter(match=f"{registry.p}:*"))
    gen = registry.generation()

    def boom(label):
        if label == step:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(registry, "_step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        registry.add("half", random_adapter(SHAPES, r=2, seed=2))
    with pytest.raises(RuntimeError, match="injected"):
        registry.add("keep", random_adapter(SHAPES, r=2, seed=3))
    assert sorted(registry.r.scan_iter(match=f"{registry.p}:*")) == before
    assert registry.names() == ["keep"] and registry.info("keep").version == 1
    assert registry.generation() == gen


def test_delete_all_versions(registry):
    registry.add("s", random_adapter(SHAPES, r=2, seed=1))
    registry.add("s", random_adapter(SHAPES, r=2, seed=2))
    gone = registry.delete("s")
    assert [g.ref for g in gone] == ["s@1", "s@2"]
    assert registry.names() == [] and not registry.exists("s")
    assert list(registry.r.scan_iter(match=f"{registry.p}:s:*")) == []
    with pytest.raises(NotFoundError):
        registry.delete("s")


def test_generation_bumps_on_every_change(registry):
    g0 = registry.generation()
    registry.add("s", random_adapter(SHAPES, r=2, seed=1))
    registry.delete("s")
    assert registry.generation() == g0 + 2


def test_parse_ref():
    assert parse_ref("a") == ("a", None)
    assert parse_ref("a@12") == ("a", 12)
    for bad in ("a@0", "a@", "a@-1", "a@\u00b2", "a@\u0661"):  # superscript two, Arabic-Indic one: isdigit() but not versions
        with pytest.raises(InvalidRequestError):
            parse_ref(bad)
