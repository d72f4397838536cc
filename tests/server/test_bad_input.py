"""Hostile or malformed requests that once cost a 500: each is now a 4xx in OpenAI's shape (issue #14's
exact requests; the engine is the reference one, these never reach it)."""

import uuid

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import TEST_REDIS_URL, _drop_prefix


@pytest.fixture(scope="module")
def client(redis_client):
    prefix = f"mosaic-test-{uuid.uuid4().hex[:10]}"
    try:
        with TestClient(create_app(Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix))) as c:
            yield c
    finally:
        _drop_prefix(redis_client, prefix)


def _refused(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_a_version_that_only_looks_like_digits(client):
    assert "version" in _refused(client.get("/v1/adapters/sentiment@%C2%B2"))["message"]


def test_a_nan_merge_parameter(client, base_spec):
    body = {"model": base_spec.model_id, "messages": [{"role": "user", "content": "x"}],
            "composition": {"skills": ["a", "b"], "method": "ties", "params": {"density": "nan"}}}
    assert "finite" in _refused(client.post("/v1/chat/completions", json=body))["message"]

