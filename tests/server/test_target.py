"""One decision of which adapter serves a plan (server/core/planner.py ``target_for``): the key the Ray ingress
routes by is the name of the folder the replica serves from and of its engine id, for every kind of plan.
Real Redis, real files; no engine needed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from composer import Composition
from router.plan import Plan
from server.core.adapter_cache import AdapterCache
from server.core.planner import serve_plan
from server.ray.routing import plan_key
from tests.helpers import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.v_proj": (32, 32)}
PLANS = {
    "a skill": Plan(kind="skill", skill="small"),
    "a skill above the engine's rank limit": Plan(kind="skill", skill="big"),
    "a composition": Plan(kind="composition", composition=Composition(skills=("small", "big"), weights=(1.0, 0.5))),
    "a context-aware plan left with one skill": Plan(
        kind="composition", composition=Composition(skills=("small", "big"), weights=(0.0, 1.0)), alpha=[0.0, 1.0]),
}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_the_routing_key_names_what_the_replica_serves(registry, tmp_path, plan):
    registry.add("small", random_adapter(SHAPES, 4, seed=1))
    registry.add("big", random_adapter(SHAPES, 8, seed=2))
    cache = AdapterCache(registry, tmp_path, max_rank=4)
    service = SimpleNamespace(cache=cache)

    async def both():
        key = await plan_key(service, plan)
        adapter, info = await serve_plan(service, plan)
        return key, adapter, info

    key, adapter, info = asyncio.run(both())
    assert Path(adapter.path).name == key and (Path(adapter.path) / "adapter_config.json").exists()
    assert adapter.int_id == registry.engine_ids.get(key)
    if plan.skill == "big":  # served cut to the engine's rank: the key says so, as the folder does
        assert key.endswith("-r4") and info.rank == 4 and info.refactored
    if plan.alpha is not None:  # one skill left: served alone, exactly (the skill's own folder)
        assert info.skills == ["big@1"] and key == asyncio.run(plan_key(service, PLANS["a skill above the engine's rank limit"]))
