"""Connecting to the registry's Redis, starting a managed local one when none answers."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from lora.errors import UnavailableError

log = logging.getLogger("mosaic.redis")


def connect(url: str, *, managed_dir: Path | None = None, timeout: float = 2.0) -> redis.Redis:
    """A client for ``url``; if nothing answers on a loopback URL and ``redis-server`` exists,
    start a persistent loopback-only Redis with its data under ``managed_dir`` and say so."""
    # a restarted Redis leaves dead pooled connections: retry each command on a fresh one (a transaction
    # that was WATCHing fails with WatchError instead, and the registry recomputes it)
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    try:
        client.ping()
        return client
    except redis.ConnectionError as exc:
        host = urlparse(url).hostname or "127.0.0.1"
        binary = shutil.which("redis-server")
        if managed_dir is None or binary is None or host not in ("127.0.0.1", "localhost", "::1"):
            raise UnavailableError(f"no Redis answers at {url}: {exc}") from exc
    port = urlparse(url).port or 6379
    managed_dir.mkdir(parents=True, exist_ok=True)
    log.warning("no Redis at %s: starting a managed redis-server on 127.0.0.1:%d (data in %s)", url, port, managed_dir)
    subprocess.run(
        [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(managed_dir),
            "--appendonly", "yes", "--daemonize", "yes", "--logfile", str(managed_dir / "redis.log"),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise UnavailableError(f"managed redis-server did not answer on port {port}: {exc}") from exc
            time.sleep(0.1)
