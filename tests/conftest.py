import os
import uuid

import pytest
import redis

from adapter_store.registry import Registry

TEST_REDIS_URL = os.environ.get("MOSAIC_TEST_REDIS_URL", "redis://127.0.0.1:6379/3")
# a TestClient on this machine, as server/auth.py tells one: a loopback client address and Host
LOCAL, LOCAL_URL = ("127.0.0.1", 50000), "http://127.0.0.1"


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.ping()  # a test run without Redis is a broken setup, not a skip
    return client


def _drop_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def registry(redis_client):
    """A registry under a fresh key prefix, removed afterwards (never FLUSHALL)."""
    prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
    yield Registry(redis_client, prefix=prefix)
    _drop_prefix(redis_client, prefix)


@pytest.fixture(scope="session")
def base_spec():
    """The real bundled base model's module shapes (prepared once under MOSAIC_DATA_DIR)."""
    from adapter_store.validation import BaseModelSpec
    from server.base_model import base_model_id, prepare
    from server.settings import Settings

    settings = Settings()
    return BaseModelSpec.from_dir(prepare(settings, quiet=True), model_id=base_model_id(settings))
