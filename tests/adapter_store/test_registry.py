"""The Redis registry: exact round trips, versions, atomic writes, deletes."""

import pytest

from adapter_store.skill_info import parse_ref
from lora.adapter import LoraAdapter, config_sha256
from lora.errors import InvalidRequestError, NotFoundError
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
    before = sorted(registry.r.scan_iter(match=f"{registry.prefix}:*"))
    gen = registry.generation()

    def boom(label):
        if label == step:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(registry, "_step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        registry.add("half", random_adapter(SHAPES, r=2, seed=2))
    with pytest.raises(RuntimeError, match="injected"):
        registry.add("keep", random_adapter(SHAPES, r=2, seed=3))
    assert sorted(registry.r.scan_iter(match=f"{registry.prefix}:*")) == before
    assert registry.names() == ["keep"] and registry.info("keep").version == 1
    assert registry.generation() == gen


def test_delete_all_versions(registry):
    registry.add("s", random_adapter(SHAPES, r=2, seed=1))
    registry.add("s", random_adapter(SHAPES, r=2, seed=2))
    gone = registry.delete("s")
    assert [g.ref for g in gone] == ["s@1", "s@2"]
    assert registry.names() == [] and not registry.exists("s")
    # only the version counter stays, so that the name's numbers are never handed out again
    assert list(registry.r.scan_iter(match=f"{registry.prefix}:s:*")) == [f"{registry.prefix}:s:s:next".encode()]
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


def test_versions_are_never_reused_even_after_every_version_was_deleted(registry):
    a1, a2, other = (random_adapter(SHAPES, r=2, seed=s) for s in (1, 2, 3))
    registry.add("vtest", a1)
    registry.add("vtest", a2)
    registry.delete("vtest")
    info = registry.add("vtest", other)  # issue #14's exact sequence: it was vtest@1 again
    assert info.version == 3 and registry.info("vtest@3").sha256 == other.sha256()
    with pytest.raises(NotFoundError):
        registry.info("vtest@1")


def test_the_content_id_covers_the_config_that_changes_the_delta(registry):
    import copy

    base = random_adapter(SHAPES, r=2, seed=1)
    louder = LoraAdapter(config={**copy.deepcopy(base.config), "lora_alpha": base.config["lora_alpha"] * 10},
                         tensors=base.tensors)
    a, b = registry.add("sentiment", base), registry.add("loud", louder)
    assert a.sha256 == b.sha256  # the same weights file ...
    assert a.content_id != b.content_id and not a.same_content(louder)  # ... but not the same ΔW
    # spellings of one config are one content; what PEFT ignores at inference does not count
    respelled = {**base.config, "target_modules": list(reversed(base.config["target_modules"])), "rank_pattern": {},
                 "lora_dropout": 0.3, "inference_mode": False, "use_rslora": False}
    assert config_sha256(respelled) == config_sha256(base.config)
    assert a.same_content(LoraAdapter(config=respelled, tensors=base.tensors))
    for changed in ({"use_rslora": True}, {"r": 4}, {"alpha_pattern": {"q_proj": 3}}, {"target_modules": ["q_proj"]}):
        assert config_sha256({**base.config, **changed}) != config_sha256(base.config), changed


def test_engine_ids_come_from_a_counter_shared_by_replicas(registry, redis_client):
    from adapter_store.registry import Registry

    other_replica = Registry(redis_client, prefix=registry.prefix)
    # two content ids with one 31-bit prefix: the truncated hash that was the engine id gave both one id
    one, two = "aaaaaaaa" + "1" * 56, "aaaaaaaa" + "2" * 56
    ids = {registry.engine_ids.get(one), registry.engine_ids.get(two)}
    assert len(ids) == 2 and all(isinstance(i, int) and i > 0 for i in ids)
    assert other_replica.engine_ids.get(one) == registry.engine_ids.get(one)
    assert other_replica.engine_ids.get(two) == registry.engine_ids.get(two)


def test_an_engine_never_gets_one_id_for_two_contents_after_redis_lost_its_ids(registry, tmp_path):
    import asyncio

    from server.core.adapter_cache import AdapterCache

    cache = AdapterCache(registry, tmp_path, max_rank=64)
    first = asyncio.run(cache.engine_id("content-a"))
    registry.r.delete(f"{registry.prefix}:engine-ids", f"{registry.prefix}:engine-ids:next")  # Redis restarted empty
    second = asyncio.run(cache.engine_id("content-b"))
    assert second != first and asyncio.run(cache.engine_id("content-a")) == first
    assert registry.engine_ids.get("content-c") > second  # the counter moved past every id this engine holds


def _round_trips(registry, monkeypatch) -> list[str]:
    """Record every command sent on its own and every pipeline sent (one round trip each)."""
    sent: list[str] = []
    plain, pipeline = registry.r.execute_command, registry.r.pipeline

    def execute_command(*args, **kw):
        sent.append(str(args[0]))
        return plain(*args, **kw)

    def counted_pipeline(*args, **kw):
        pipe = pipeline(*args, **kw)
        execute = pipe.execute

        def execute_counted(*a, **k):
            sent.append("pipeline")
            return execute(*a, **k)

        pipe.execute = execute_counted
        return pipe

    monkeypatch.setattr(registry.r, "execute_command", execute_command)
    monkeypatch.setattr(registry.r, "pipeline", counted_pipeline)
    return sent


def test_listing_takes_the_same_round_trips_for_any_library_size(registry, monkeypatch):
    adapter = random_adapter({"m.q_proj": (8, 8)}, r=1)
    counts = []
    for size in (3, 30):
        while len(registry.names()) < size:
            registry.add(f"s{len(registry.names()):03d}", adapter)
        expected = sorted(registry.names())
        sent = _round_trips(registry, monkeypatch)
        listed = [s.name for s in registry.list()]
        counts.append(len(sent))
        assert listed == expected
        monkeypatch.undo()
    assert counts[0] == counts[1] <= 3, counts


def test_pages_cover_the_library_once_in_name_order(registry):
    adapter = random_adapter({"m.q_proj": (8, 8)}, r=1)
    names = [f"team/s{i:02d}" for i in range(7)] + ["alone", "zeta"]
    for name in names:
        registry.add(name, adapter)
    registry.add("alone", random_adapter({"m.q_proj": (8, 8)}, r=1, seed=1))  # version 2 is the one listed
    seen, after = [], None
    while page := registry.list(after=after, limit=4):
        seen += page
        after = page[-1].name
    assert [s.name for s in seen] == sorted(names)
    assert {s.name: s.version for s in seen}["alone"] == 2
    assert registry.list(after="team/s03", limit=2) == registry.list()[5:7]
    registry.delete("team/s04")  # a page may start after a name that no longer exists
    assert [s.name for s in registry.list(after="team/s04", limit=2)] == ["team/s05", "team/s06"]
    assert [s.name for s in registry.list(namespace="team", limit=3)] == ["team/s00", "team/s01", "team/s02"]
    assert [s.name for s in registry.list(namespace="team", after="team/s05")] == ["team/s06"]
