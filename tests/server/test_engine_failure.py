"""An engine that fails to start: /health says so, inference gets a 503 in OpenAI's shape, and the
library API keeps answering."""

import time
import uuid

from fastapi.testclient import TestClient

from server.api.app import create_app
from server.core import engine as engine_module
from server.core.settings import Settings
from tests.helpers import LOCAL, LOCAL_URL, TEST_REDIS_URL, drop_prefix


def test_engine_failure_is_a_clear_503(monkeypatch, redis_client, base_spec):
    async def broken_start(self):
        raise RuntimeError("no memory for the KV cache")

    monkeypatch.setattr(engine_module.HfEngine, "start", broken_start)
    prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
    settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix)
    try:
        with TestClient(create_app(settings), client=LOCAL, base_url=LOCAL_URL) as client:
            for _ in range(50):
                health = client.get("/health")
                if health.json()["status"] == "error":
                    break
            assert health.status_code == 503 and health.json()["status"] == "error"
            r = client.post("/v1/chat/completions", json={"model": base_spec.model_id, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "server_error" and "engine" in r.json()["error"]["message"]
            assert client.get("/v1/adapters").status_code == 200
            assert client.get("/v1/models").status_code == 200
    finally:
        drop_prefix(redis_client, prefix)


def _wait_for(client, status: str, tries: int = 2400):
    for _ in range(tries):
        health = client.get("/health")
        if health.json()["status"] == status:
            return health
        time.sleep(0.05)
    raise AssertionError(f"health never became {status!r}: {health.json()}")


def test_engine_that_fails_or_dies_is_restarted(monkeypatch, redis_client, base_spec):
    """The real reference engine: its first start fails, the supervisor restarts it; later it dies
    (not ready any more) and is restarted again; inference works after each recovery."""
    real_start = engine_module.HfEngine.start
    starts = []

    async def flaky_start(self):
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise RuntimeError("transient failure")
        await real_start(self)

    monkeypatch.setattr(engine_module.HfEngine, "start", flaky_start)
    prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
    settings = Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix, engine_restart_seconds=0.2,
                        engine_check_seconds=0.05)
    body = {"model": base_spec.model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with TestClient(create_app(settings), client=LOCAL, base_url=LOCAL_URL) as client:
            health = _wait_for(client, "ok")
            assert health.json()["engine_restarts"] == 1 and len(starts) == 2
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            client.app.state.mosaic.engine._model = None  # the engine dies under the server
            health = _wait_for(client, "ok")
            assert health.json()["engine_restarts"] == 2 and len(starts) == 3
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        drop_prefix(redis_client, prefix)
