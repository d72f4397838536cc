"""The change log and a process's view of the library: after any sequence of writes, from any replica, the
view read change by change equals a full read of the registry, and it reads the whole library only once."""

from __future__ import annotations

import random

import redis

from adapter_store.compression import CompressOptions, compress_library
from adapter_store.library_view import LibraryView
from adapter_store.registry import Registry
from tests.helpers import random_adapter, structured_library

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16)}


def _hidden(info) -> bool:
    return "hidden" in info.tags


def _full_read(registry: Registry) -> list[dict]:
    return [s.model_dump() for s in registry.list() if not _hidden(s)]


def _seen(view: LibraryView) -> list[dict]:
    return [s.model_dump() for s in view.current()]


def test_changes_since_names_every_change_in_order(registry):
    g0, mark0 = registry.mark()
    registry.add("a", random_adapter(SHAPES, r=2, seed=1))
    registry.add("b", random_adapter(SHAPES, r=2, seed=2))
    g2, mark2 = registry.mark()
    registry.add("a", random_adapter(SHAPES, r=2, seed=3))
    registry.delete("a@1")
    now, mark, changes = registry.changes_since(g0, mark0)
    assert (g0, mark0) == (0, None) and now == 4 == registry.generation() and (now, mark) == registry.mark()
    assert changes == [("add", "a@1"), ("add", "b@1"), ("add", "a@2"), ("delete", "a@1")]
    assert registry.changes_since(g2, mark2) == (now, mark, [("add", "a@2"), ("delete", "a@1")])
    assert registry.changes_since(now, mark) == (now, mark, [])
    assert registry.changes_since(g2, "another-history").changes is None
    assert registry.changes_since(now + 1, mark).changes is None  # the generation went back: another Redis
    registry.r.ltrim(registry.keys.changes, -2, -1)  # the log no longer reaches back to g2's entry
    assert registry.changes_since(g2, mark2).changes is None
    registry.r.incr(registry.keys.gen)  # a change made without an entry (older code)
    assert registry.changes_since(now, mark).changes is None


def test_a_flushed_redis_written_past_the_old_generation_is_read_again(registry):
    view = LibraryView(registry)
    for i in range(3):
        registry.add(f"old{i}", random_adapter(SHAPES, r=2, seed=i))
    assert [s.name for s in view.current()] == ["old0", "old1", "old2"]
    for key in list(registry.r.scan_iter(match=f"{registry.prefix}:*")):  # Redis lost everything
        registry.r.delete(key)
    for i in range(5):
        registry.add(f"new{i}", random_adapter(SHAPES, r=2, seed=10 + i))
    assert [s.name for s in view.current()] == [f"new{i}" for i in range(5)] and view.full_reads == 2


def test_view_read_change_by_change_equals_a_full_read(registry, redis_client: redis.Redis):
    other = Registry(redis_client, prefix=registry.prefix)  # another replica writing to the same library
    view = LibraryView(registry, keep=lambda s: not _hidden(s))
    rng = random.Random(7)
    names = [f"skill-{i}" for i in range(8)]
    assert _seen(view) == _full_read(registry) == []
    for step in range(80):
        writer = rng.choice([registry, other])
        name = rng.choice(names)
        have = [v.version for v in writer.versions(name)] if writer.exists(name) else []
        action = rng.random()
        if action < 0.55 or not have:
            tags = ["hidden"] if rng.random() < 0.2 else []
            writer.add(name, random_adapter(SHAPES, r=2, seed=step), description=f"step {step}",
                       examples=[f"example {step}"], tags=tags)
        elif action < 0.8:
            writer.delete(f"{name}@{rng.choice(have)}")  # maybe the latest: the one before shows again
        else:
            writer.delete(name)
        if rng.random() < 0.7:  # sometimes several changes between two reads
            first = view.current()
            assert [s.model_dump() for s in first] == _full_read(registry), step
            assert view.current() is first  # nothing changed: the same list
            assert view.generation == registry.generation()
    assert _seen(view) == _full_read(registry)
    assert view.full_reads == 1


def test_view_reads_everything_again_when_the_log_fell_behind(registry):
    view = LibraryView(registry)
    registry.add("a", random_adapter(SHAPES, r=2, seed=1))
    assert [s.name for s in view.current()] == ["a"]
    registry.add("b", random_adapter(SHAPES, r=2, seed=2))
    registry.add("c", random_adapter(SHAPES, r=2, seed=3))
    registry.r.delete(registry.keys.changes)  # e.g. data written before the log was kept
    registry.add("d", random_adapter(SHAPES, r=2, seed=4))
    assert [s.name for s in view.current()] == ["a", "b", "c", "d"]
    assert view.full_reads == 2
    registry.delete("b")
    assert [s.name for s in view.current()] == ["a", "c", "d"] and view.full_reads == 2


def test_view_follows_a_compression(registry):
    for i, adapter in enumerate(structured_library(4, seed=0)):
        registry.add(f"skill{i}", adapter)
    view = LibraryView(registry)
    before = _seen(view)
    compress_library(registry, CompressOptions(shard_width=4, pool_size=24, error_budget=0.05, max_private=0.5))
    after = _seen(view)
    assert after == [s.model_dump() for s in registry.list()] and after != before  # re-encoded: new mos meta
    assert view.full_reads == 1


def test_a_reader_takes_the_last_list_while_another_catches_up(registry):
    view = LibraryView(registry)
    registry.add("a", random_adapter(SHAPES, r=2, seed=1))
    first = view.current()
    registry.add("b", random_adapter(SHAPES, r=2, seed=2))
    with view._lock:  # another thread is reading the changes (or waiting on a lost Redis)
        assert view.current() is first and view.last == (1, first)
    assert [s.name for s in view.current()] == ["a", "b"] and view.generation == 2
