"""``mosaic serve``: the OpenAI-compatible server."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from server.cli.common import fail, settings

if TYPE_CHECKING:
    from server.core.settings import Settings


def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    ray: Annotated[bool, typer.Option("--ray", help="serve on Ray Serve: an ingress and Mosaic replicas, each request "
                                       "sent to a replica that holds its adapter (server/ray/app.py); joins the "
                                       "cluster at RAY_ADDRESS, else starts a local one")] = False,
    replicas: Annotated[int | None, typer.Option(min=1, help="with --ray: Mosaic replicas, each its own engine "
                                                  "(default 2)")] = None,
) -> None:
    """Run the OpenAI-compatible server (the engine starts in the background; /health says when ready)."""
    import logging

    from server.core.engine import cpu_preload
    from server.edge.auth import is_loopback

    if replicas is not None and not ray:
        fail("--replicas counts the Mosaic replicas of --ray; without --ray one server runs (add --ray)", 2)
    s = settings()
    if not is_loopback(host) and not (s.api_key or s.open_admin or _keys_locked(s)):
        fail(f"refusing to serve on {host}: the server has no API key, so anyone who can reach it could change "
             "and read the library. Set MOSAIC_API_KEY (or create a key: `mosaic keys create NAME --scope admin`), "
             "or set MOSAIC_OPEN_ADMIN=true if that is what you want; on 127.0.0.1 no key is needed", 2)
    if s.engine == "vllm" and s.preload and (preload := cpu_preload(dict(os.environ))):
        # the loader reads LD_PRELOAD when a process starts: start again, the same command, with it
        # (MOSAIC_PRELOAD=false: don't)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "LD_PRELOAD": preload})
    if ray:
        from server.ray.app import run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(host, port, replicas or 2)
        return
    import uvicorn

    from server.api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(s), host=host, port=port, log_level="info")


def _keys_locked(s: Settings) -> bool:
    """Whether API keys exist (they lock the admin endpoints); False when the library can't be reached."""
    from adapter_store.keys import KeyStore
    from lora.errors import MosaicError
    from server.core.state import open_registry

    try:
        registry = open_registry(s)
        return KeyStore(registry.r, s.redis_prefix, high_water=registry.high_water).locked()
    except MosaicError:
        return False
