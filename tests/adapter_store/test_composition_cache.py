"""The composition cache in Redis stays within its byte budget, evicts least recently used first, and
drops what a deleted skill content alone was used for. Checked against a plain LRU model and against
Redis's own measure of what is stored (HSTRLEN), in real Redis."""

from __future__ import annotations

import itertools
import json
import threading
from collections import OrderedDict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from adapter_store.composition_cache import CompositionCache
from adapter_store.registry import Registry
from tests.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16)}
RESULTS = [random_adapter(SHAPES, r, seed=r) for r in (1, 2, 4)]  # three sizes
CONTENTS = ["c0", "c1", "c2"]


def stored_bytes(cache: CompositionCache, key: str) -> int:
    """What Redis says the result takes (independent of the cache's own count)."""
    return sum(cache.r.hstrlen(cache._k("c", key), f) for f in ("meta", "config", "weights"))


def size_of(adapter, meta: dict) -> int:
    return len(json.dumps(meta)) + len(adapter.config_bytes()) + len(adapter.weights_bytes())


def fresh(registry: Registry, budget: int) -> CompositionCache:
    tick = itertools.count(1)
    return CompositionCache(registry.r, registry.prefix, budget, clock=lambda: float(next(tick)))


def test_least_recently_used_goes_first_and_a_touch_counts_as_use(registry):
    meta = {"rank": 1}
    one = size_of(RESULTS[0], meta)
    cache = fresh(registry, budget=2 * one)
    assert cache.put("a", RESULTS[0], meta, ["c0"]) == []
    assert cache.put("b", RESULTS[0], meta, ["c1"]) == []
    assert cache.get("a") is not None  # a is now more recent than b
    assert cache.put("c", RESULTS[0], meta, ["c2"]) == ["b"]
    assert cache.get("b") is None and cache.keys() == ["a", "c"]
    assert cache.stored_bytes() == stored_bytes(cache, "a") + stored_bytes(cache, "c") == 2 * one
    assert cache.made_from("c1") == set()


def test_storing_a_key_again_is_not_counted_twice(registry):
    cache = fresh(registry, budget=10**9)
    for _ in range(3):
        cache.put("a", RESULTS[2], {"rank": 4}, ["c0"])
    assert cache.stored_bytes() == stored_bytes(cache, "a")


def test_a_result_larger_than_the_whole_budget_is_not_kept(registry):
    cache = fresh(registry, budget=10)
    assert cache.put("big", RESULTS[0], {"rank": 1}, ["c0"]) == ["big"]
    assert cache.get("big") is None and cache.stored_bytes() == 0 and cache.made_from("c0") == set()


def test_results_cached_before_the_budget_are_counted_and_go_first(registry):
    legacy = registry._k("c", "legacy")
    registry.r.hset(legacy, mapping={"meta": "{}", "config": RESULTS[0].config_bytes(),
                                     "weights": RESULTS[0].weights_bytes()})
    assert registry.upgrade()["compositions_adopted"] == 1
    assert registry.upgrade()["compositions_adopted"] == 0  # idempotent
    cache = registry.compositions
    assert cache.stored_bytes() == stored_bytes(cache, "legacy")
    cache.budget = cache.stored_bytes() + 1
    assert cache.put("new", RESULTS[0], {}, ["c0"]) == ["legacy"]


def test_deleting_a_skill_drops_compositions_made_from_content_nobody_else_has(registry):
    x, y = random_adapter(SHAPES, 2, seed=10), random_adapter(SHAPES, 2, seed=11)
    ix, iy = registry.add("x", x), registry.add("y", y)
    registry.add("x-copy", x)  # the same content under another name
    registry.compositions.put("xy", RESULTS[0], {}, [ix.content_id, iy.content_id])
    registry.compositions.put("yy", RESULTS[0], {}, [iy.content_id])
    registry.delete("x")
    assert registry.compositions.get("xy") is not None  # x's content is still served by x-copy
    registry.delete("x-copy")
    assert registry.compositions.get("xy") is None and registry.compositions.get("yy") is not None
    assert registry.compositions.keys() == ["yy"]
    assert registry.compositions.stored_bytes() == stored_bytes(registry.compositions, "yy")
    assert registry.unused([ix.content_id, iy.content_id]) == [ix.content_id]


def test_versions_stored_before_the_content_index_are_indexed_once(registry):
    info = registry.add("old", random_adapter(SHAPES, 1, seed=3))
    registry.r.delete(registry._k("content", info.content_id))  # as an older server left it
    assert registry.unused([info.content_id]) == [info.content_id]
    assert registry.upgrade()["versions_indexed"] == 1
    assert registry.unused([info.content_id]) == []
    assert registry.upgrade()["versions_indexed"] == 0


def test_replicas_putting_at_once_keep_the_count_exact(registry):
    """Two registries (two replicas) on one Redis, eight threads: the count is what Redis stores."""
    budget = 3 * size_of(RESULTS[2], {"rank": 4})
    caches = [fresh(registry, budget), fresh(Registry(registry.r, prefix=registry.prefix), budget)]

    def work(i: int) -> None:
        for j in range(20):
            cache = caches[(i + j) % 2]
            cache.put(f"k{(i * 7 + j) % 9}", RESULTS[j % 3], {"rank": j % 3}, [CONTENTS[j % 3]])
            cache.get(f"k{j % 9}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache = caches[0]
    keys = cache.keys()
    assert cache.stored_bytes() == sum(stored_bytes(cache, k) for k in keys) <= budget
    assert set(registry.r.hkeys(cache._k("cache", "size"))) == {k.encode() for k in keys}
    for c in CONTENTS:
        assert cache.made_from(c) <= set(keys)


class CacheMachine(RuleBasedStateMachine):
    """Random puts, gets, evictions and drops against a plain LRU model of the same budget."""

    registry: Registry

    @initialize(budget=st.integers(0, 4000))
    def start(self, budget: int) -> None:
        for key in self.registry.r.scan_iter(match=f"{self.registry.prefix}:*"):  # each example starts empty
            self.registry.r.delete(key)
        self.cache = fresh(self.registry, budget)
        # key -> (bytes, inputs, which result), least recently used first
        self.model: OrderedDict[str, tuple[int, frozenset[str], int]] = OrderedDict()

    def _evict(self) -> None:
        while self.model and sum(m[0] for m in self.model.values()) > self.cache.budget:
            self.model.popitem(last=False)

    @rule(key=st.sampled_from("abcd"), result=st.integers(0, 2), inputs=st.sets(st.sampled_from(CONTENTS), max_size=3))
    def put(self, key: str, result: int, inputs: set[str]) -> None:
        meta = {"rank": result}
        self.cache.put(key, RESULTS[result], meta, sorted(inputs))
        self.model.pop(key, None)
        self.model[key] = (size_of(RESULTS[result], meta), frozenset(inputs), result)
        self._evict()

    @rule(key=st.sampled_from("abcd"))
    def get(self, key: str) -> None:
        got = self.cache.get(key)
        assert (got is not None) == (key in self.model)
        if got is not None:
            self.model.move_to_end(key)
            result = self.model[key][2]
            assert got[0] == {"rank": result} and got[1].weights_bytes() == RESULTS[result].weights_bytes()

    @rule(content=st.sampled_from(CONTENTS))
    def drop(self, content: str) -> None:
        expected = sorted(k for k, (_, inputs, _r) in self.model.items() if content in inputs)
        assert sorted(self.cache.drop_made_from([content])) == expected
        for k in expected:
            del self.model[k]

    @rule(budget=st.integers(0, 4000))
    def shrink(self, budget: int) -> None:
        self.cache.budget = budget
        self.cache.evict()
        self._evict()

    @invariant()
    def matches_the_model(self) -> None:
        if not hasattr(self, "cache"):
            return
        assert self.cache.keys() == list(self.model)
        assert self.cache.stored_bytes() == sum(stored_bytes(self.cache, k) for k in self.model)
        assert self.cache.stored_bytes() == sum(m[0] for m in self.model.values())
        for c in CONTENTS:
            assert self.cache.made_from(c) == {k for k, (_, inputs, _r) in self.model.items() if c in inputs}


def test_the_cache_behaves_as_an_lru_of_its_budget(registry):
    CacheMachine.registry = registry
    machine = CacheMachine.TestCase
    machine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None,
                                suppress_health_check=[HealthCheck.function_scoped_fixture])
    try:
        machine().runTest()
    finally:
        for key in registry.r.scan_iter(match=f"{registry.prefix}:*"):
            registry.r.delete(key)
