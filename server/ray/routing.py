"""What the Ray ingress (server/ray/app.py) decides on its own: the application's options, the checks a
request passes before its body is read, the multiplexed model id it is routed by, and how a replica's
failure is answered."""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lora.errors import MosaicError
from router.plan import Plan
from server.edge import auth, limits
from server.edge.errors import error_response

log = logging.getLogger("mosaic.ray")

REPLICA_HEADER = "x-mosaic-replica"  # which replica served the request (its Ray replica id)
# the multiplexed model id the ingress routed by ("" : any replica), on answers to callers who may read the library
ADAPTER_HEADER = "x-mosaic-adapter"
INFO_PATH = "/v1/ray/replica"  # a replica's own state: GET ...?model=NAME asks the replica that holds NAME
INFERENCE = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses"}


class RayOptions(BaseModel):
    """How the application is laid out on the Ray cluster (the application builder's arguments)."""

    replicas: int = Field(default=2, ge=1)
    replica_cpus: float = Field(default=1.0, gt=0)  # Ray's num_cpus per replica (fractions share a core)
    ingress_cpus: float = Field(default=0.25, gt=0)
    affinity: bool = True  # False: no model id, Ray balances by queue length alone (the benchmark's baseline)
    request_timeout_s: float = Field(default=300.0, gt=0)  # the longest wait for a replica's next answer
    plan_timeout_s: float = Field(default=5.0, gt=0)  # planning at the ingress; past it, any replica serves
    max_ongoing_requests: int = Field(default=16, ge=1)  # per replica, before Ray sends its requests elsewhere
    ready_timeout_s: float = Field(default=900.0, gt=0)  # a replica's engine start, at most
    env: dict[str, str] = Field(default_factory=dict)  # MOSAIC_* (and VLLM_*) settings of every replica and the ingress
    # the Ray node whose loopback MOSAIC_REDIS_URL names (set by `mosaic serve --ray`): a replica placed on
    # another node refuses to start rather than serve a library of its own
    redis_node: str | None = None


# ---- before the body is read ----------------------------------------------------------------------------------
async def admitted_body(app, request: Request) -> bytes | Response:
    """The request's body, or the answer that refuses it: the key checked first (the route's scope, as
    Mosaic's own AuthGate does), then the body's size against ``MOSAIC_MAX_REQUEST_MB`` /
    ``MOSAIC_MAX_UPLOAD_MB``, declared or counted as it arrives."""
    scope = request.scope
    if (refused := auth.refusal(app, scope)) is not None:
        return refused
    meter = limits.BodyMeter(app.state.mosaic.settings, scope)
    if (refused := meter.declared()) is not None:
        return refused
    chunks = []
    async for chunk in request.stream():
        if (over := meter.add(chunk)) is not None:
            return limits.refusal(over)
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the ingress's choice of replica ----------------------------------------------------------------------
async def routing_key(service, request: Request, body: bytes, timeout: float) -> str:
    """The multiplexed model id ``request`` goes out with ("" : any replica), decided within ``timeout``
    seconds (a router still loading must not hold the request: the replica plans it again anyway), with
    the namespace of the request's key, as the replica plans it: a name outside it gets no id."""
    ns = request.scope.get(auth.NAMESPACE)
    if request.method == "POST":
        planned = adapter_key(service, request.url.path, body, ns, request.scope)
    elif request.url.path == INFO_PATH and request.query_params.get("model") and ns is None:
        planned = model_key(service, request.query_params["model"])
    else:
        return ""
    try:
        return await asyncio.wait_for(planned, timeout)
    except asyncio.TimeoutError:
        log.warning("planning %s took over %g s: sent to any replica", request.url.path, timeout)
    except Exception:  # noqa: BLE001 - not a refusal (those are handled below): the replica plans it again and answers
        log.warning("planning %s failed at the ingress: sent to any replica", request.url.path, exc_info=True)
    return ""


async def adapter_key(service, path: str, body: bytes, namespace: str | None = None, scope: dict | None = None) -> str:
    """The multiplexed model id of an inference request: the key of the adapter that will serve it ("" for the
    base model, a route that does not generate, or a request the replica will refuse, such as one naming a
    skill outside the key's ``namespace``: any replica then answers it, with its error). The plan is recorded
    in ``scope`` (``PLANNED``): the ingress hands it to the replica, which serves it without planning again."""
    kind = INFERENCE.get(path)
    if kind is None:
        return ""
    from vllm.exceptions import VLLMClientError

    from composer.spec import Composition
    from server.core.planner import PLANNED, plan_for
    from server.front.endpoints import endpoint
    from server.front.parse import loads

    try:
        data = loads(body)
        if not isinstance(data, dict):
            return ""
        for check in (limits.check_raw_prompts, limits.check_raw_messages):  # as the replica does, before validating
            check(service.settings, data)
        ep = endpoint(kind)
        raw = data.pop("composition", None)
        req = ep.protocol(data).model_validate(data)
        composition = None if raw is None else Composition.model_validate(raw)
        plan = await plan_for(service, req.model or service.base_id, composition, ep.routed(service, req), namespace)
        key = await plan_key(service, plan)
        if scope is not None:
            scope[PLANNED] = plan.model_dump(mode="json")
        return key
    except (MosaicError, ValueError, VLLMClientError) as exc:  # not found, refused, malformed: the replica says so
        log.debug("no adapter key for %s: %s", path, exc)
        return ""


async def model_key(service, model: str) -> str:
    """The multiplexed model id of ``model`` (a skill reference, a stored composition, the base id)."""
    from server.core.planner import plan_for

    try:
        return await plan_key(service, await plan_for(service, model, None, ""))
    except MosaicError as exc:
        log.debug("no adapter key for %s: %s", model, exc)
        return ""


def adapter_header(service, scope, status: int, key: str) -> dict[str, str]:
    """The ``x-mosaic-adapter`` header of an answer: the id the ingress routed by (a skill's content id),
    told only on a success (a refused request learns nothing of the library from the routing) and only to
    a caller who may read the library (server/edge/auth.py)."""
    if status >= 400 or not auth.may_read(service, scope)[0]:
        return {}
    return {ADAPTER_HEADER: key}


async def plan_key(service, plan: Plan) -> str:
    """What the replica will serve ``plan`` with: the key of its Target (server/core/planner.py ``target_for``,
    the one decision), which also names the replica's adapter folder and engine id; "" for the base model."""
    from server.core.planner import target_for

    target = await target_for(service, plan)
    return "" if target is None else target.key


# ---- a replica that failed ----------------------------------------------------------------------------------
def failed(exc: BaseException, timeout: float) -> JSONResponse:
    """The answer to a replica call that failed: 503 when the replica died, timed out or could not take
    the request (try again: another replica or its replacement answers), 500 for anything else."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return error_response(503, f"the replica serving this request did not answer within {timeout:g} s; try again",
                              "server_error", "service_unavailable")
    if isinstance(exc, StopAsyncIteration) or unavailable(exc):
        log.warning("replica failed: %s", exc)
        return error_response(503, "the replica serving this request stopped; try again (another replica, or its "
                              "replacement, will answer)", "server_error", "service_unavailable")
    log.error("replica call failed", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")


def unavailable(exc: BaseException) -> bool:
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


async def rest(answer, timeout: float):
    """A stream's events after its start; if the replica fails mid-stream, an error event and [DONE] end it
    (the status line has left already), as Mosaic ends a stream whose engine failed. However the stream
    ends (its client gone included), the replica's call is cancelled if it still runs."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    finished = False
    try:
        while True:
            try:
                yield await asyncio.wait_for(answer.__anext__(), timeout)
            except StopAsyncIteration:
                finished = True
                return
    except (asyncio.TimeoutError, TimeoutError, RayError, RayServeException) as exc:
        body = json.loads(failed(exc, timeout).body)
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:
            answer.cancel()


def redis_elsewhere(redis_url: str, redis_node: str | None, here: str) -> str | None:
    """Why a replica on Ray node ``here`` must not start: ``redis_url`` is a loopback address of another
    node (``redis_node``, where `mosaic serve --ray` reached Redis), so here it would be no Redis or a
    different library."""
    url = urlsplit(redis_url)
    if redis_node and redis_node != here and (url.scheme == "unix" or auth.is_loopback(url.hostname)):
        return (f"MOSAIC_REDIS_URL={redis_url} is an address local to the node that started Mosaic, and this deployment "
                "runs on another node: give every node a Redis address they all reach (docs/SCALING.md)")
    return None


def cpu_list(cores: list[int], rank: int, per_replica: float) -> str:
    """The cores the engine of a node's ``rank``-th replica binds its threads to (vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND`` list form): ``per_replica`` of them (at least one), contiguous, the
    replicas of a node side by side, wrapping round when there are more replicas than cores."""
    n = max(1, min(len(cores), int(per_replica)))
    start = (rank * n) % len(cores)
    chosen = sorted((cores * 2)[start:start + n])
    return ",".join(map(str, chosen))
