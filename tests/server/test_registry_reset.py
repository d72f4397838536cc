"""A Redis that forgets (flushed, or restored from an older copy) under a running server or between starts:
the data dir remembers that keys were made, the registry's generation and the highest version handed out
(adapter_store/high_water.py). The server stays locked, refuses writes and refuses to start until a reset
is accepted (MOSAIC_ACCEPT_REGISTRY_RESET=true); then versions go on above the old ones."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from adapter_store.high_water import HighWater, RegistryBehindError
from adapter_store.keys import KeyStore
from adapter_store.registry import Registry
from server.api.app import create_app
from server.core import engine as engine_module
from server.core.settings import Settings
from tests.helpers import LOCAL, LOCAL_URL, TEST_REDIS_URL, drop_prefix, new_prefix, random_adapter

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def server(monkeypatch, redis_client, tmp_path, base_model_dir, base_spec):
    """make(**settings) -> a TestClient on one prefix and one data dir, across restarts; the engine stays down."""
    async def idle(self):
        return None

    monkeypatch.setattr(engine_module.HfEngine, "start", idle)
    prefix = new_prefix()

    def make(**kw) -> TestClient:
        settings = Settings(engine="hf", router="lexical", redis_url=TEST_REDIS_URL, redis_prefix=prefix,
                            data_dir=tmp_path / "data", base_model=str(base_model_dir),
                            base_model_id=base_spec.model_id, **kw)
        return TestClient(create_app(settings), client=LOCAL, base_url=LOCAL_URL)

    make.prefix = prefix
    yield make
    drop_prefix(redis_client, prefix)


def _adapter(base_spec, seed: int):
    return random_adapter({Q: base_spec.shapes[Q]}, r=1, seed=seed, base_model=base_spec.model_id)


def _upload(client, tmp_path, base_spec, seed: int, key: str = "root-secret"):
    folder = _adapter(base_spec, seed).save_dir(tmp_path / f"up{seed}")
    files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir())]
    return client.post("/v1/adapters", data={"name": "tiny"}, files=files, headers={"Authorization": f"Bearer {key}"})


def test_a_flushed_redis_leaves_a_running_server_locked(server, redis_client, base_spec):
    client = server()
    with client:
        service = client.app.state.mosaic
        assert client.delete("/v1/adapters/ghost").status_code == 404  # no keys yet: open on loopback
        KeyStore(redis_client, server.prefix).create("ops", ["admin"])  # `mosaic keys create`, or another replica
        assert client.delete("/v1/adapters/ghost").status_code == 401
        service.registry.add("tiny", _adapter(base_spec, 1))
        drop_prefix(redis_client, server.prefix)  # Redis flushed under the running server
        # the request that reopened admin: a loopback client without a key
        for r in (client.delete("/v1/adapters/ghost"), client.get("/v1/adapters")):
            assert r.status_code == 401, r.text
        # a write on the forgetful Redis: refused, nothing written
        with pytest.raises(RegistryBehindError, match="MOSAIC_ACCEPT_REGISTRY_RESET"):
            service.registry.add("tiny", _adapter(base_spec, 2))
        assert not list(redis_client.scan_iter(match=f"{server.prefix}:s:*"))
    # a restart refuses the registry as it is, naming the setting that accepts it
    with pytest.raises(RegistryBehindError, match="MOSAIC_ACCEPT_REGISTRY_RESET=true"):
        with server():
            pass
    with server(accept_registry_reset=True) as client:
        assert client.delete("/v1/adapters/ghost").status_code == 401  # still locked, with no key in Redis
    assert KeyStore(redis_client, server.prefix).locked()  # the lock is back in Redis, for every replica
    with server() as client:  # accepted once: the next start serves
        assert client.get("/v1/adapters").status_code == 401


def test_name_at_n_never_means_other_bytes_after_a_flush(server, redis_client, base_spec, tmp_path):
    with server(api_key="root-secret") as client:
        assert [_upload(client, tmp_path, base_spec, s).json()["version"] for s in (1, 2)] == [1, 2]
        old = client.get("/v1/adapters/tiny@1", headers={"Authorization": "Bearer root-secret"}).json()["content_id"]
        drop_prefix(redis_client, server.prefix)
        r = _upload(client, tmp_path, base_spec, 3)
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_behind", r.text
        assert "MOSAIC_ACCEPT_REGISTRY_RESET" in r.json()["error"]["message"]
        assert not list(redis_client.scan_iter(match=f"{server.prefix}:s:*"))  # the registry is unchanged
    with server(api_key="root-secret", accept_registry_reset=True) as client:
        r = _upload(client, tmp_path, base_spec, 3)
        assert r.status_code == 201 and r.json()["version"] == 3, r.text  # above every version handed out before
        got = client.get("/v1/adapters/tiny@1", headers={"Authorization": "Bearer root-secret"})
        assert got.status_code == 404 and old not in got.text
    with server(api_key="root-secret") as client:
        assert _upload(client, tmp_path, base_spec, 4).json()["version"] == 4


def test_a_flush_under_a_server_that_accepts_resets_goes_on_counting(server, redis_client, base_spec):
    with server(accept_registry_reset=True) as client:
        registry = client.app.state.mosaic.registry
        assert [registry.add("tiny", _adapter(base_spec, s)).version for s in (1, 2)] == [1, 2]
        drop_prefix(redis_client, server.prefix)
        assert registry.add("tiny", _adapter(base_spec, 3)).version == 3
        assert registry.add("other", _adapter(base_spec, 4)).version == 3  # every name counts on above the old ones
        assert registry.add("tiny", _adapter(base_spec, 5)).version == 4


def test_a_redis_written_again_past_the_mark_is_told_by_its_change_log(redis_client, base_spec, tmp_path):
    """A restored or flushed Redis that other writers have brought back up beyond this data dir's generation:
    the change log's entry at that generation is another one."""
    prefix = new_prefix()
    try:
        ours = Registry(redis_client, prefix, high_water=HighWater.for_registry(tmp_path, TEST_REDIS_URL, prefix))
        ours.add("a", _adapter(base_spec, 1))
        ours.add("b", _adapter(base_spec, 2))
        drop_prefix(redis_client, prefix)
        other = Registry(redis_client, prefix)  # a writer without this data dir
        for name in ("x", "y", "z"):
            other.add(name, _adapter(base_spec, 3))
        with pytest.raises(RegistryBehindError, match="change log at generation 2"):
            ours.add("a", _adapter(base_spec, 4))
        with pytest.raises(RegistryBehindError):
            ours.delete("x")
        assert other.names() == ["x", "y", "z"]
        # another process on the same data dir (the CLI) reads the same marks; accepting, it counts on above them
        marks = HighWater.for_registry(tmp_path, TEST_REDIS_URL, prefix, accept_reset=True)
        assert marks.marks.max_version == 1 and marks.marks.generation == 2
        assert Registry(redis_client, prefix, high_water=marks).add("a", _adapter(base_spec, 4)).version == 2
        state = json.loads(marks.path.read_text())
        assert state["version_floor"] == 1 and state["generation"] == 4 and "prefix" in state["registry"]
    finally:
        drop_prefix(redis_client, prefix)


def test_the_marks_are_kept_per_registry_and_without_the_password(tmp_path):
    a = HighWater.for_registry(tmp_path, "redis://:hunter2@10.0.0.5:6379/0", "mosaic")
    b = HighWater.for_registry(tmp_path, "redis://:hunter2@10.0.0.5:6379/1", "mosaic")
    c = HighWater.for_registry(tmp_path, "redis://:hunter2@10.0.0.5:6379/0", "other")
    assert len({a.path, b.path, c.path}) == 3
    a.saw_keys()
    assert "hunter2" not in a.path.read_text() and json.loads(a.path.read_text())["keys_seen"]
    assert not b.keys_seen and HighWater.for_registry(tmp_path, "redis://:hunter2@10.0.0.5:6379/0", "mosaic").keys_seen
