"""Connecting to Redis, and the managed local redis-server when none answers."""

import shutil

import pytest
import redis

from adapter_store.redis_conn import connect
from lora.errors import UnavailableError
from server.cli.launch import free_port as _free_port


def test_no_redis_and_not_allowed_to_start_one_is_a_clear_error():
    with pytest.raises(UnavailableError, match="no Redis answers"):
        connect(f"redis://127.0.0.1:{_free_port()}/0", managed_dir=None, timeout=0.5)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_managed_redis_is_started_persistent_and_loopback(tmp_path):
    port = _free_port()
    client = connect(f"redis://127.0.0.1:{port}/0", managed_dir=tmp_path / "redis", timeout=0.5)
    try:
        client.set("k", "v")
        cfg = client.config_get("*")
        assert cfg["appendonly"] == "yes" and cfg["bind"] == "127.0.0.1" and cfg["dir"] == str(tmp_path / "redis")
    finally:
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass
