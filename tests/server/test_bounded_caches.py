"""What requests leave behind stays bounded: the engine's folders on disk within MOSAIC_ADAPTER_DISK_MB
(least recently used out first, never one in use), and a deleted skill takes with it the folders and
cached compositions that only it was used for. Real Redis, real files; no engine needed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from composer import Composition
from server.adapter_cache import AdapterCache
from server.folders import STALE, Folders
from tests.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.v_proj": (32, 32)}


def folder(root: Path, kind: str, name: str, size: int) -> Path:
    f = root / kind / name
    f.mkdir(parents=True)
    (f / "adapter_config.json").write_text("{}")
    (f / "adapter_model.safetensors").write_bytes(b"\0" * (size - 2))
    return f


def test_least_recently_used_folders_go_first(tmp_path):
    folders = Folders(tmp_path, budget_bytes=250, grace=0)
    a, b, c = (folder(tmp_path, "adapters", n, 100) for n in "abc")
    assert folders.added(a, ["a"]) == [] and folders.added(b, ["b"]) == []
    assert folders.claim(a)  # a used again: b is now the oldest
    assert folders.added(c, ["c"]) == [b]
    assert not b.exists() and a.exists() and c.exists()
    assert folders.total() == 200
    assert not folders.claim(b)  # gone: the caller writes it again


def test_a_folder_used_within_the_grace_period_is_never_removed(tmp_path):
    folders = Folders(tmp_path, budget_bytes=150, grace=60)
    a, b = folder(tmp_path, "adapters", "a", 100), folder(tmp_path, "adapters", "b", 100)
    folders.added(a, ["a"])
    assert folders.added(b, ["b"]) == []  # over budget for now, but a was just used
    assert a.exists() and b.exists()


def test_folders_left_by_an_earlier_run_are_counted_oldest_first(tmp_path):
    old, new = folder(tmp_path, "adapters", "old", 100), folder(tmp_path, "compositions", "new", 100)
    crashed, in_progress = tmp_path / "adapters" / ".tmp.x", tmp_path / "adapters" / ".tmp.y"
    crashed.mkdir()
    in_progress.mkdir()  # another process on this data dir, writing now
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(crashed, (time.time() - 2 * STALE, time.time() - 2 * STALE))
    folders = Folders(tmp_path, budget_bytes=250, grace=0)
    assert folders.total() == 200 and not crashed.exists() and in_progress.exists()
    assert folders.added(folder(tmp_path, "adapters", "third", 100), ["third"]) == [old]
    assert new.exists()


def test_deleting_a_skill_removes_what_only_it_used(registry, tmp_path):
    """Skill folders and composition folders on disk, composition results in Redis: those made from a
    content nobody serves any more go; those another version still serves stay."""
    x, y = random_adapter(SHAPES, 4, seed=1), random_adapter(SHAPES, 4, seed=2)
    registry.add("x", x)
    registry.add("x-copy", x)
    registry.add("y", y)
    cache = AdapterCache(registry, tmp_path, max_rank=64)

    async def serve():
        xs = await cache.skill("x")
        ys = await cache.skill("y")
        both = await cache.composition(Composition(skills=("x", "y"), weights=(1.0, 0.5)))
        only_y = await cache.composition(Composition(skills=("y",), weights=(0.5,)))
        return [Path(s.adapter.path) for s in (xs, ys, both, only_y)]

    x_dir, y_dir, both_dir, y_comp_dir = asyncio.run(serve())
    assert all((d / "adapter_config.json").exists() for d in (x_dir, y_dir, both_dir, y_comp_dir))
    both_key, y_key = both_dir.name, y_comp_dir.name
    assert set(registry.compositions.keys()) == {both_key, y_key}

    gone = registry.delete("x")
    assert asyncio.run(cache.forget(gone)) == []  # x-copy still serves that content
    assert x_dir.exists() and registry.compositions.get(both_key) is not None

    gone = registry.delete("x-copy")
    assert sorted(asyncio.run(cache.forget(gone))) == sorted([x_dir, both_dir])
    assert not x_dir.exists() and not both_dir.exists() and y_dir.exists() and y_comp_dir.exists()
    assert registry.compositions.get(both_key) is None and registry.compositions.get(y_key) is not None
    assert not cache.knows("x")


def test_composition_folders_stay_within_the_disk_budget(registry, tmp_path):
    """Many distinct compositions (any client can ask for new ones): disk and Redis both stay bounded,
    and an evicted composition is simply computed again when asked for."""
    for i in range(3):
        registry.add(f"s{i}", random_adapter(SHAPES, 2, seed=10 + i))
    one = len(random_adapter(SHAPES, 2).weights_bytes()) * 2  # a 2-skill exact composition is rank 4
    registry.compositions.budget = 3 * one
    cache = AdapterCache(registry, tmp_path, max_rank=64, disk_bytes=4 * one)
    cache.folders.grace = 0

    async def serve_many():
        served = []
        for w in range(1, 13):
            served.append(await cache.composition(Composition(skills=("s0", "s1"), weights=(1.0, w / 4))))
        return served

    served = asyncio.run(serve_many())
    assert all(s.cache == "miss" for s in served)
    on_disk = list((tmp_path / "compositions").iterdir())
    assert 0 < len(on_disk) <= 4 and cache.folders.total() <= 4 * one + 1024
    assert registry.compositions.stored_bytes() <= 3 * one and len(registry.compositions.keys()) <= 3
    first = served[0]
    assert not Path(first.adapter.path).exists()
    again = asyncio.run(cache.composition(Composition(skills=("s0", "s1"), weights=(1.0, 0.25))))
    assert again.cache == "miss" and Path(again.adapter.path).exists() and again.adapter.path == first.adapter.path
