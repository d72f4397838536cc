"""Redis going away under the registry: a test-owned redis-server (AOF on) stopped or killed in the
middle of an upload. No half skill is ever visible, and the same client works again once Redis is back."""

from __future__ import annotations

import shutil
import threading

import pytest
import redis

from lora.errors import UnavailableError
from adapter_store.registry import Registry
from tests.helpers import OwnRedis, random_adapter

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

SHAPES = {f"model.layers.{i}.self_attn.q_proj": (64, 64) for i in range(2)}


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path / "redis")
    client = server.start()
    yield server, client
    try:
        redis.Redis.from_url(server.url).shutdown(nosave=True)
    except redis.ConnectionError:
        pass


def _visible(registry: Registry) -> dict[str, list[tuple[int, str]]]:
    """Every skill and version a reader can see, with the sha256 of the bytes it would load."""
    seen = {}
    for name in registry.names():
        seen[name] = [(i.version, registry.load(i.ref)[1].sha256()) for i in registry.versions(name)]
        for version, sha in seen[name]:
            assert registry.load(f"{name}@{version}")[0].sha256 == sha  # metadata matches the bytes
    return seen


def test_redis_gone_between_staging_and_commit_leaves_nothing_and_reconnects(own_redis, monkeypatch):
    server, client = own_redis
    registry = Registry(client, prefix="faults")
    kept = registry.add("kept", random_adapter(SHAPES, 4, seed=1))
    monkeypatch.setattr(registry, "_step", lambda label: server.kill() if label == "pointers-written" else None)
    with pytest.raises(UnavailableError, match="Redis"):
        registry.add("half", random_adapter(SHAPES, 4, seed=2))
    monkeypatch.undo()
    server.start()
    # the restarted server replayed its append-only file: the earlier skill is whole, the new one absent
    assert _visible(registry) == {"kept": [(1, kept.sha256)]}
    assert not list(client.scan_iter(match="faults:s:half:*"))
    # the same client reconnects by itself: the retried upload lands as version 1
    assert registry.add("half", random_adapter(SHAPES, 4, seed=2)).version == 1


def test_restart_mid_upload_is_retried_once_and_lands_whole(own_redis, monkeypatch):
    server, client = own_redis
    registry = Registry(client, prefix="faults")
    restarts = []

    def restart(label: str) -> None:
        if label == "pointers-written" and not restarts:
            restarts.append(label)
            server.kill()
            server.start()

    monkeypatch.setattr(registry, "_step", restart)
    adapter = random_adapter(SHAPES, 4, seed=2)
    info = registry.add("again", adapter)  # the transaction's connection died: WATCH fails it, the loop retries
    assert restarts and info.version == 1
    assert _visible(registry) == {"again": [(1, adapter.sha256())]}


def test_kill_during_a_large_upload_never_shows_half_a_skill(own_redis):
    server, client = own_redis
    registry = Registry(client, prefix="faults")
    big = random_adapter({f"model.layers.{i}.mlp.up_proj": (4096, 4096) for i in range(8)}, 64, seed=3)  # 17 MB
    outcomes = []
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        killer = threading.Timer(delay, server.kill)
        killer.start()
        try:
            registry.add("big", big)
            outcomes.append("stored")
        except UnavailableError:
            outcomes.append("refused")
        killer.join()
        if _alive(server):
            server.kill()
        server.start()
        seen = _visible(registry)  # whatever survived is whole: every visible version loads with its hash
        assert set(seen) <= {"big"}
        assert all(sha == big.sha256() for _, sha in seen.get("big", []))
        # an acknowledged upload survives the kill (a refused one may have committed before its reply was lost)
        assert len(seen.get("big", [])) >= outcomes.count("stored")


def _alive(server: OwnRedis) -> bool:
    try:
        redis.Redis.from_url(server.url, socket_connect_timeout=0.2).ping()
        return True
    except redis.ConnectionError:
        return False
