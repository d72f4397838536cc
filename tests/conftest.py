import pytest
import redis

from adapter_store.registry import Registry
from tests.helpers import TEST_REDIS_URL, drop_prefix, new_prefix


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.ping()  # a test run without Redis is a broken setup, not a skip
    return client


@pytest.fixture
def registry(redis_client):
    """A registry under a fresh key prefix, removed afterwards (never FLUSHALL)."""
    prefix = new_prefix()
    yield Registry(redis_client, prefix=prefix)
    drop_prefix(redis_client, prefix)


@pytest.fixture(scope="session")
def base_model_dir():
    """The real bundled base model's folder (prepared once under MOSAIC_DATA_DIR)."""
    from server.core.base_model import prepare
    from server.core.settings import Settings

    return prepare(Settings(), quiet=True)


@pytest.fixture(scope="session")
def base_spec(base_model_dir):
    """The real bundled base model's module shapes."""
    from adapter_store.validation import BaseModelSpec
    from server.core.base_model import base_model_id
    from server.core.settings import Settings

    return BaseModelSpec.from_dir(base_model_dir, model_id=base_model_id(Settings()))
