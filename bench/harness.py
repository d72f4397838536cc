"""A real Mosaic server for benchmarks: own key prefix, own data dir, demo skills registered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "bench" / "skills"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(extra_env: dict | None = None, timeout: float = 900):
    """Yields (url, env, health) of a fresh server; removes its keys and files afterwards."""
    from server.base_model import base_model_id, prepare
    from server.settings import Settings

    settings = Settings()
    prefix = f"mosaic-bench-{uuid.uuid4().hex[:8]}"
    data = tempfile.mkdtemp(prefix="mosaic-bench-")
    env = dict(os.environ, MOSAIC_REDIS_PREFIX=prefix, MOSAIC_DATA_DIR=data, MOSAIC_BASE_MODEL=str(prepare(settings)),
               MOSAIC_BASE_MODEL_ID=base_model_id(settings), **(extra_env or {}))
    for d in sorted(SKILLS.iterdir()):
        subprocess.run([sys.executable, "-m", "server.cli", "skills", "add", str(d), "--name", d.name],
                       env=env, check=True, capture_output=True, cwd=ROOT)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(data) / "server.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                h = httpx.get(f"{url}/health", timeout=2)
                if h.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise SystemExit("server failed to start; see " + log.name)
            time.sleep(0.5)
        yield url, env, {**h.json(), "ready_s": time.monotonic() - t0}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
