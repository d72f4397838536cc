"""API keys: hashed in Redis, scoped; 401 without a key, 403 with one lacking the scope."""

import uuid

import pytest
from fastapi.testclient import TestClient

from adapter_store.keys import KeyStore
from server import engine as engine_module
from server.app import create_app
from server.settings import Settings
from tests.conftest import TEST_REDIS_URL, _drop_prefix


@pytest.fixture
def app_factory(monkeypatch, redis_client):
    async def idle(self):  # the library API is what is tested here; the engine stays down
        return None

    monkeypatch.setattr(engine_module.HfEngine, "start", idle)
    prefixes = []

    def make(**kw):
        prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix, **kw)
        return TestClient(create_app(settings)), KeyStore(redis_client, prefix)

    yield make
    for p in prefixes:
        _drop_prefix(redis_client, p)


def _delete(client, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.delete("/v1/adapters/ghost", headers=headers)


def test_open_until_a_key_exists_then_scoped(app_factory, redis_client):
    client, keys = app_factory()
    with client:
        assert _delete(client).status_code == 404  # open: reaches the handler (no such skill)
        admin_key, _ = keys.create("ops", ["admin"])
        user_key, _ = keys.create("app", ["inference"])
        r = _delete(client)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert _delete(client, "mk-wrong").status_code == 401
        r = _delete(client, user_key)
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        assert _delete(client, admin_key).status_code == 404
        assert client.get("/v1/adapters").status_code == 200  # reading the library needs no key
        keys.revoke("ops")
        assert _delete(client, admin_key).status_code == 401
    # only hashes are stored
    dump = b"".join(v for k in redis_client.scan_iter(match=f"{keys.k_info.split(':')[0]}:keys:*")
                    for v in redis_client.hgetall(k).values())
    assert user_key.encode() not in dump and admin_key.encode() not in dump


def test_root_key_and_inference_keys(app_factory):
    client, keys = app_factory(api_key="root-secret", require_inference_key=True)
    with client:
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        assert _delete(client, "root-secret").status_code == 404
        user_key, _ = keys.create("app", ["inference"])
        r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user_key}"})
        assert r.status_code == 503  # past auth; the engine is down in this test
        assert _delete(client, user_key).status_code == 403


def test_key_names_and_scopes_are_checked(redis_client):
    keys = KeyStore(redis_client, f"mosaic-test-{uuid.uuid4().hex[:10]}")
    with pytest.raises(ValueError, match="scopes"):
        keys.create("a", ["root"])
    with pytest.raises(ValueError, match="not allowed"):
        keys.create("bad name", ["admin"])
    keys.create("a", ["admin"])
    with pytest.raises(Exception, match="exists"):
        keys.create("a", ["admin"])
    keys.revoke("a")
