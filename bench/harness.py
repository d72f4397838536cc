"""A real Mosaic server for benchmarks: own key prefix, own data dir, demo skills registered."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

from server.cli.launch import ROOT, mosaic_cli, serving

SKILLS = ROOT / "bench" / "skills"


def bench_env(extra_env: dict | None = None) -> dict:
    """The environment of a benchmark server: its own Redis key prefix and data folder."""
    from server.core.base_model import base_model_id, prepare
    from server.core.settings import Settings

    settings = Settings()
    return dict(os.environ, MOSAIC_REDIS_PREFIX=f"mosaic-bench-{uuid.uuid4().hex[:8]}",
                MOSAIC_DATA_DIR=tempfile.mkdtemp(prefix="mosaic-bench-"), MOSAIC_BASE_MODEL=str(prepare(settings)),
                MOSAIC_BASE_MODEL_ID=base_model_id(settings), **(extra_env or {}))


def drop_env(env: dict) -> None:
    """Remove a benchmark server's keys and files."""
    from server.core.settings import Settings

    client = redis.Redis.from_url(env.get("MOSAIC_REDIS_URL", Settings().redis_url))
    keys = list(client.scan_iter(match=f"{env['MOSAIC_REDIS_PREFIX']}:*"))
    if keys:
        client.delete(*keys)
    shutil.rmtree(env["MOSAIC_DATA_DIR"], ignore_errors=True)


@contextmanager
def running_server(extra_env: dict | None = None, timeout: float = 900):
    """Yields (url, env, health) of a fresh server with the demo skills; removes its keys and files afterwards."""
    env = bench_env(extra_env)
    try:
        for d in sorted(SKILLS.iterdir()):
            done = mosaic_cli(env, "skills", "add", str(d), "--name", d.name)
            if done.returncode:
                raise SystemExit(f"registering {d.name} failed:\n{done.stderr}")
        with serving(env, Path(env["MOSAIC_DATA_DIR"]) / "server.log", timeout=timeout) as (url, proc, ready_s):
            yield url, env, {**httpx.get(f"{url}/health").json(), "ready_s": ready_s, "pid": proc.pid}
    finally:
        drop_env(env)
