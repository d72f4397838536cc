"""One real Mosaic server (real vLLM engine, real Redis, the bundled base model) for the serving tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from server.cli.launch import mosaic_cli, serving
from tests.helpers import DEMO, drop_prefix, mosaic_env, new_prefix

START_TIMEOUT = 600


@pytest.fixture(scope="session")
def server_env(base_model_dir, base_spec, tmp_path_factory):
    return mosaic_env(base_model_dir, base_spec.model_id, tmp_path_factory.mktemp("mosaic-data"))


@pytest.fixture(scope="session")
def server(server_env, redis_client):
    """Registers the demo skills with the CLI, starts `mosaic serve`, waits for /health."""
    for d in sorted(DEMO.iterdir()):
        done = mosaic_cli(server_env, "skills", "add", str(d), "--name", d.name)
        assert done.returncode == 0, done.stderr
    log = Path(server_env["MOSAIC_DATA_DIR"]) / "server.log"
    try:
        with serving(server_env, log, timeout=START_TIMEOUT) as (url, proc, ready_s):
            print(f"\n[mosaic] server ready in {ready_s:.1f} s", file=sys.stderr)
            yield {"url": url, "env": server_env, "proc": proc}
    finally:
        drop_prefix(redis_client, server_env["MOSAIC_REDIS_PREFIX"])
        shutil.rmtree(server_env["MOSAIC_DATA_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="test", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def fuzz_server(server_env, redis_client, tmp_path_factory):
    """One server for both fuzz modules (a start is a minute or two on 2 cores): its own prefix and data,
    generation capped at 4 tokens and jobs at 20,000 tokens read, the sentiment skill registered; yields (url, data folder, registry)."""
    from adapter_store.registry import Registry

    data = tmp_path_factory.mktemp("fuzz")
    prefix = new_prefix("fuzz")
    # jobs capped like generation: a fuzzed learn or optimize request within the default bounds would train in the
    # background for many minutes of the 2 cores the fuzzing needs
    env = {**server_env, "MOSAIC_REDIS_PREFIX": prefix, "MOSAIC_DATA_DIR": str(data), "MOSAIC_MAX_TOKENS_LIMIT": "4",
           "MOSAIC_MAX_JOB_TOKENS": "20000"}
    assert mosaic_cli(env, "skills", "add", str(DEMO / "sentiment"), "--name", "sentiment").returncode == 0
    try:
        with serving(env, data / "server.log") as (url, _, _):
            yield url, data, Registry(redis_client, prefix=prefix)
    finally:
        drop_prefix(redis_client, prefix)

