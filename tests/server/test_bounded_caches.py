"""What requests leave behind stays bounded: the engine's folders on disk within MOSAIC_ADAPTER_DISK_MB,
folders in use and recently used included (least recently used out first, never one a request holds; a
new folder with no room is a 503, one larger than the budget a 400, neither written), and a deleted skill
takes with it the folders and cached compositions that only it was used for. Real Redis, real files; no
engine needed."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import pytest

from composer import Composition
from lora.errors import InvalidRequestError, UnavailableError
from server.core.adapter_cache import AdapterCache
from server.core.folders import STALE, Folders
from server.edge.errors import http_status
from tests.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.v_proj": (32, 32)}


def folder(root: Path, kind: str, name: str, size: int) -> Path:
    f = root / kind / name
    f.mkdir(parents=True)
    (f / "adapter_config.json").write_text("{}")
    (f / "adapter_model.safetensors").write_bytes(b"\0" * (size - 2))
    return f


def write(folders: Folders, root: Path, name: str, size: int = 100):
    """A folder admitted and written as the adapter cache does it; returns its hold."""
    hold = folders.admit(root / "adapters" / name, size, [name])
    folder(root, "adapters", name, size)
    return hold


def on_disk(root: Path) -> int:
    """Every byte under the data folder, half-written and hidden folders included."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def test_least_recently_used_folders_go_first(tmp_path):
    folders = Folders(tmp_path, budget_bytes=250, grace=0)
    for name in "ab":
        write(folders, tmp_path, name).release()
    a, b = tmp_path / "adapters" / "a", tmp_path / "adapters" / "b"
    folders.claim(a).release()  # a used again: b is now the oldest
    write(folders, tmp_path, "c").release()
    assert not b.exists() and a.exists() and (tmp_path / "adapters" / "c").exists()
    assert folders.total() == 200 == on_disk(tmp_path)
    assert folders.claim(b) is None  # gone: the caller writes it again


def test_recently_used_folders_count_against_the_budget(tmp_path):
    """The budget bounds the total, the grace set included: with no folder old enough to go, a new one is
    refused (503) and not written."""
    folders = Folders(tmp_path, budget_bytes=150, grace=60)
    write(folders, tmp_path, "a").release()
    with pytest.raises(UnavailableError, match="MOSAIC_ADAPTER_DISK_MB") as refused:
        folders.admit(tmp_path / "adapters" / "b", 100, ["b"])
    assert "MOSAIC_ADAPTER_GRACE_SECONDS" in refused.value.message
    assert folders.total() == 100 == on_disk(tmp_path) and (tmp_path / "adapters" / "a").exists()


def test_a_folder_larger_than_the_budget_is_refused_before_anything_is_removed(tmp_path):
    folders = Folders(tmp_path, budget_bytes=1000, grace=0)
    write(folders, tmp_path, "a").release()
    with pytest.raises(InvalidRequestError, match="MOSAIC_ADAPTER_DISK_MB") as refused:
        folders.admit(tmp_path / "compositions" / "big", 29_500_000, ["a", "b"], param="composition")
    assert refused.value.param == "composition" and http_status(refused.value) == 400
    assert (tmp_path / "adapters" / "a").exists() and folders.total() == 100


def test_a_held_folder_is_never_removed(tmp_path):
    """Held (a request in flight): not evicted, and a delete's forget waits for the last hold."""
    folders = Folders(tmp_path, budget_bytes=250, grace=0)
    held = write(folders, tmp_path, "a")
    write(folders, tmp_path, "b").release()
    for name in "cdef":  # each new folder evicts the one before it, never a
        write(folders, tmp_path, name).release()
        assert (tmp_path / "adapters" / "a").exists() and on_disk(tmp_path) <= 250
    assert folders.forget({"a"}) == [] and (tmp_path / "adapters" / "a").exists()
    held.release()
    assert folders.total() == 100 and not (tmp_path / "adapters" / "a").exists()


def test_held_folders_leave_no_room_then_a_503(tmp_path):
    folders = Folders(tmp_path, budget_bytes=250, grace=0)
    holds = [write(folders, tmp_path, name) for name in "ab"]
    with pytest.raises(UnavailableError):
        folders.admit(tmp_path / "adapters" / "c", 100, ["c"])
    assert not (tmp_path / "adapters" / "c").exists()
    del holds  # garbage collected: released, as a request's adapter is when the request is over
    gc.collect()
    write(folders, tmp_path, "c").release()
    assert on_disk(tmp_path) <= 250 and folders.held() == 0


def test_folders_left_by_an_earlier_run_are_counted_oldest_first(tmp_path):
    old, new = folder(tmp_path, "adapters", "old", 100), folder(tmp_path, "compositions", "new", 100)
    crashed, in_progress = tmp_path / "adapters" / ".tmp.x", tmp_path / "adapters" / ".tmp.y"
    crashed.mkdir()
    in_progress.mkdir()  # another process on this data dir, writing now
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(crashed, (time.time() - 2 * STALE, time.time() - 2 * STALE))
    folders = Folders(tmp_path, budget_bytes=250, grace=60)
    assert folders.total() == 200 and not crashed.exists() and in_progress.exists()
    write(folders, tmp_path, "third").release()  # the earlier run's folders are not in their grace
    assert not old.exists() and new.exists()


def test_a_lowered_budget_holds_from_the_start(tmp_path):
    for i, name in enumerate("abc"):
        f = folder(tmp_path, "adapters", name, 100)
        os.utime(f, (time.time() - 100 + i, time.time() - 100 + i))
    folders = Folders(tmp_path, budget_bytes=150, grace=60)
    assert folders.total() == 100 == on_disk(tmp_path) and (tmp_path / "adapters" / "c").exists()


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


def _skills(registry, n: int = 3) -> int:
    """``n`` skills s0.. in the registry; the bytes one 2-skill composition folder of them takes."""
    for i in range(n):
        registry.add(f"s{i}", random_adapter(SHAPES, 2, seed=10 + i))
    return len(random_adapter(SHAPES, 2).weights_bytes()) * 2  # a 2-skill exact composition is rank 4


def _distinct(i: int) -> Composition:
    return Composition(skills=("s0", "s1"), weights=(1.0, (i + 1) / 4))


def test_composition_folders_stay_within_the_disk_budget(registry, tmp_path):
    """Many distinct compositions (any client can ask for new ones): disk and Redis both stay bounded,
    and an evicted composition is simply computed again when asked for."""
    one = _skills(registry)
    registry.compositions.budget = 3 * one
    cache = AdapterCache(registry, tmp_path, max_rank=64, disk_bytes=4 * one + 4096, grace=0)

    async def serve_many():
        paths = []
        for i in range(12):
            served = await cache.composition(_distinct(i))
            assert served.cache == "miss" and on_disk(tmp_path) <= 4 * one + 4096
            paths.append(Path(served.adapter.path))
        return paths

    paths = asyncio.run(serve_many())
    on_disk_now = list((tmp_path / "compositions").iterdir())
    assert 0 < len(on_disk_now) < 12 and cache.folders.total() == on_disk(tmp_path) <= 4 * one + 4096
    assert registry.compositions.stored_bytes() <= 3 * one and len(registry.compositions.keys()) <= 3
    assert not paths[0].exists()
    again = asyncio.run(cache.composition(_distinct(0)))
    assert again.cache == "miss" and Path(again.adapter.path).exists() and Path(again.adapter.path) == paths[0]


def test_a_1000_byte_budget_never_holds_more_than_1000_bytes(registry, tmp_path):
    """The exact case seen: a 1,000-byte budget once kept 10,000 bytes (every folder was in its 600 s grace)
    and one 16-skill composition wrote 29.5 MB. Now each folder larger than the budget is a 400 and never
    written, whatever the grace."""
    _skills(registry, 16)
    cache = AdapterCache(registry, tmp_path, max_rank=64, disk_bytes=1000, grace=600)

    async def ask_many():
        refused = []
        for i in range(10):
            with pytest.raises(InvalidRequestError, match="MOSAIC_ADAPTER_DISK_MB") as e:
                await cache.composition(_distinct(i))
            refused.append(e.value)
            assert on_disk(tmp_path) <= 1000
        with pytest.raises(InvalidRequestError) as e:
            await cache.composition(Composition(skills=tuple(f"s{i}" for i in range(16))))
        return refused + [e.value]

    refused = asyncio.run(ask_many())
    assert all(http_status(e) == 400 and e.param == "composition" for e in refused)
    assert on_disk(tmp_path) == 0 and cache.folders.total() == 0


def test_the_budget_includes_recently_used_folders(registry, tmp_path):
    """Room for three folders and a 60 s grace: the fourth distinct composition in a row is a 503 (nothing
    may go yet) and the disk stays within the budget; the same composition again is served from its folder."""
    one = _skills(registry)
    budget = 3 * one + 3000
    cache = AdapterCache(registry, tmp_path, max_rank=64, disk_bytes=budget, grace=60)

    async def scenario():
        for i in range(3):
            await cache.composition(_distinct(i))
        for i in range(3, 8):
            with pytest.raises(UnavailableError, match="MOSAIC_ADAPTER_DISK_MB"):
                await cache.composition(_distinct(i))
            assert on_disk(tmp_path) <= budget
        return await cache.composition(_distinct(1))

    again = asyncio.run(scenario())
    assert again.cache == "hit" and on_disk(tmp_path) <= budget


def test_a_folder_a_request_holds_is_not_deleted(registry, tmp_path):
    """A request keeps its adapter (and so its folder) while distinct compositions go through a budget of
    two folders with no grace: the others take turns in the second place, the held one stays on disk."""
    one = _skills(registry)
    cache = AdapterCache(registry, tmp_path, max_rank=64, disk_bytes=2 * one + 2000, grace=0)

    async def scenario():
        in_flight = await cache.composition(_distinct(0))
        held = Path(in_flight.adapter.path)
        for i in range(1, 6):
            other = Path((await cache.composition(_distinct(i))).adapter.path)
            assert held.exists() and other.exists() and on_disk(tmp_path) <= 2 * one + 2000
        await cache.skill("s2")  # room for one more folder: the last composition goes, not the held one
        assert held.exists() and not other.exists()
        return in_flight

    in_flight = asyncio.run(scenario())
    path = Path(in_flight.adapter.path)
    assert cache.folders.held() == 1
    del in_flight  # the request is over
    for i in (9, 10):
        asyncio.run(cache.composition(_distinct(i)))
    assert cache.folders.held() == 0 and not path.exists() and on_disk(tmp_path) <= 2 * one + 2000
