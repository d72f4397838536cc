"""The FastAPI application: OpenAI API + skill library API + health and metrics + the console at /ui."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app

from lora.errors import MosaicError
from server.api import admin
from server.core.settings import Settings, get_settings
from server.core.state import Service, build
from server.edge import api_docs, auth, errors, limits, ui
from server.edge.headers import NoFraming
from server.front import routes as openai_routes
from server.front.endpoints import endpoint, publish_request_schemas
from server.jobs import compress_api, optimize_api

log = logging.getLogger("mosaic.server")


async def _start_engine(service: Service) -> bool:
    t0 = time.monotonic()
    try:
        await service.engine.start()
    except Exception:
        log.exception("the engine failed to start")
        service.engine_error = "the engine failed to start; see the server log"
        return False
    service.engine_start_seconds = time.monotonic() - t0
    service.engine_error = None
    log.info("engine %s ready in %.1f s", service.settings.engine, service.engine_start_seconds)
    settle_heap()
    return True


def settle_heap() -> None:
    """Move what is alive now (the model, the engine, the imported libraries: millions of objects) out of
    the cyclic garbage collector's reach. A request that allocates many objects (a large JSON body) would
    otherwise trigger full collections that scan all of it, blocking the event loop for 100 ms or more."""
    gc.unfreeze()  # a restarted engine: what the stopped one left behind is collected, not frozen for good
    gc.collect()
    gc.freeze()


async def _supervise_engine(service: Service) -> None:
    """Start the engine; if it fails to start or dies later, stop it and start it again after a
    back-off (doubling from MOSAIC_ENGINE_RESTART_SECONDS), at most MOSAIC_ENGINE_MAX_RESTARTS times
    in a row. Meanwhile /health and inference answer 503, the library API keeps working."""
    s = service.settings
    failures = 0
    while True:
        if await _start_engine(service):
            failures = 0
            while service.engine.ready():
                await asyncio.sleep(s.engine_check_seconds)
            service.engine_error = "the engine stopped; restarting it"
            log.error("the engine is no longer ready: restarting it")
            await service.engine.stop()
        failures += 1
        if failures > s.engine_max_restarts:
            service.engine_error = f"the engine failed {failures} times in a row; see the server log (not retrying)"
            log.error(service.engine_error)
            return
        delay = s.engine_restart_seconds * 2 ** (failures - 1)
        log.warning("restarting the engine in %.1f s (attempt %d of %d)", delay, failures, s.engine_max_restarts)
        await asyncio.sleep(delay)
        service.engine_restarts += 1


def _warm_router(service: Service) -> None:
    """Load the encoder and the router model before the first ``auto`` request needs them."""
    try:
        service.decide("warm up")
    except (MosaicError, OSError) as e:  # Redis or the encoder's files unavailable: auto requests retry
        log.warning("router warm-up failed (auto requests will retry): %s", e)
    settle_heap()


def _report_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("router warm-up failed", exc_info=exc)


class MosaicApp(FastAPI):
    """FastAPI with :class:`NoFraming` outside its whole middleware stack, Starlette's error middleware
    included: even an unexpected 500 says it may not be framed."""

    def build_middleware_stack(self):
        return NoFraming(super().build_middleware_stack())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = await asyncio.to_thread(build, settings)
        # vLLM's protocol modules import transformers: import them before the engine's thread does the same,
        # as two threads importing one package's circular imports can meet a half-initialised module
        await asyncio.to_thread(endpoint, "chat")
        service.started = time.time()
        app.state.mosaic = service
        if settings.open_admin and not auth.locked(service):
            log.warning("MOSAIC_OPEN_ADMIN=true and no API key: anyone who can reach this server can change and read the library")
        task = asyncio.create_task(_supervise_engine(service))
        warm = asyncio.create_task(asyncio.to_thread(_warm_router, service))
        warm.add_done_callback(_report_failure)
        try:
            yield
        finally:
            task.cancel()
            warm.cancel()
            if hasattr(app.state, "job_board"):  # jobs still running here are reported stopped within DEAD_AFTER
                app.state.job_board.close()
            await service.engine.stop()

    app = MosaicApp(title="Mosaic", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                    description="LoRA adapter composition server with an OpenAI-compatible API.")
    errors.install(app)
    app.add_middleware(limits.BodySizeLimit, settings=settings)
    app.add_middleware(auth.AuthGate, fastapi_app=app)  # outermost: the key is checked before the body is read
    app.include_router(openai_routes.router)
    app.include_router(admin.router)
    app.include_router(compress_api.router)
    app.include_router(optimize_api.router)
    app.mount("/metrics", make_asgi_app())
    ui.install(app)  # the console at /ui (static files; its API calls carry the user's key)
    api_docs.install(app)  # /docs and /redoc, their scripts served from this server

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            publish_request_schemas(spec)
            admin.publish_links(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health", tags=["ops"])
    async def health(request: Request) -> JSONResponse:
        service: Service = request.app.state.mosaic
        ready = service.engine.ready()
        body = {
            "status": "ok" if ready else ("error" if service.engine_error else "starting"),
            "engine": service.settings.engine, "base_model": service.base_id, "engine_start_seconds": service.engine_start_seconds,
            "engine_restarts": service.engine_restarts,
        }
        if service.engine_error:
            body["error"] = service.engine_error
        return JSONResponse(body, status_code=200 if ready else 503)

    return app
