"""One real Mosaic server (real vLLM engine, real Redis, the bundled base model) for the serving tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_REDIS_URL, _drop_prefix

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "bench" / "skills"
START_TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_env(base_spec, tmp_path_factory):
    from server.base_model import prepare
    from server.settings import Settings

    data = tmp_path_factory.mktemp("mosaic-data")
    env = dict(os.environ)
    env.update(
        MOSAIC_REDIS_URL=TEST_REDIS_URL,
        MOSAIC_REDIS_PREFIX=f"mosaic-test-{uuid.uuid4().hex[:10]}",
        MOSAIC_DATA_DIR=str(data),
        MOSAIC_BASE_MODEL=str(prepare(Settings(), quiet=True)),
        MOSAIC_BASE_MODEL_ID=base_spec.model_id,
        MOSAIC_ENGINE="vllm",
        MOSAIC_API_KEY="",
    )
    env.pop("MOSAIC_API_KEY")
    return env


def mosaic_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def server(server_env, redis_client):
    """Registers the demo skills with the CLI, starts `mosaic serve`, waits for /health."""
    for d in sorted(DEMO.iterdir()):
        done = mosaic_cli(server_env, "skills", "add", str(d), "--name", d.name)
        assert done.returncode == 0, done.stderr
    port = _free_port()
    log = open(Path(server_env["MOSAIC_DATA_DIR"]) / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=server_env, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + Path(log.name).read_text()[-5000:])
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > START_TIMEOUT:
                raise RuntimeError("server did not become ready:\n" + Path(log.name).read_text()[-5000:])
            time.sleep(1)
        print(f"\n[mosaic] server ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield {"url": base, "env": server_env, "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        _drop_prefix(redis_client, server_env["MOSAIC_REDIS_PREFIX"])
        shutil.rmtree(server_env["MOSAIC_DATA_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="test", max_retries=0, timeout=300)
