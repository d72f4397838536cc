"""The running server's parts, built once at start and shared by the endpoints."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from adapter_store.high_water import HighWater
from adapter_store.keys import KeyStore
from adapter_store.library_view import LibraryView
from adapter_store.redis_conn import connect
from adapter_store.registry import Registry
from adapter_store.validation import BaseModelSpec
from composer.spec import Composition
from lora.errors import UnavailableError
from router import policies
from router.plan import Plan
from router.policy import RouterPolicy, is_routable
from server.core import metrics
from server.core.adapter_cache import AdapterCache, ComposeBudget
from server.core.base_model import base_model_id, prepare
from server.core.engine import Engine, make_engine
from server.core.settings import Settings

log = logging.getLogger("mosaic.server")


@dataclass
class Service:
    """The running server's parts, built once by :func:`build` at start (``app.state.mosaic``): its settings,
    the registry, the base model's shapes, the engine, the adapter cache, the router policy and the keys."""

    settings: Settings
    registry: Registry
    base_spec: BaseModelSpec
    engine: Engine
    cache: AdapterCache
    policy: RouterPolicy
    model_dir: Path
    keys: KeyStore
    started: float = 0.0
    engine_error: str | None = None
    engine_start_seconds: float | None = None
    engine_restarts: int = 0
    tasks: list[asyncio.Task] = field(default_factory=list)
    reference: object | None = None  # the jobs' transformers model (server.jobs.learned_weights.reference_model)
    reference_lock: threading.Lock = field(default_factory=threading.Lock)
    library: LibraryView = field(init=False)  # the skills the router chooses among, kept current

    @property
    def base_id(self) -> str:
        return self.base_spec.model_id

    def __post_init__(self) -> None:
        self.library = LibraryView(self.registry, keep=is_routable)

    def skills(self) -> list:
        """The skills the router chooses among (latest versions, context-aware compositions left out)."""
        return self.library_now()[1]

    def library_now(self) -> tuple[int, list]:
        """The registry's generation and :meth:`skills` at it: after a change, only the changed skills are
        read (while Redis is unavailable: the last list read, so ``auto`` keeps routing)."""
        try:
            return self.library.read()
        except UnavailableError:
            if (last := self.library.last)[0] < 0:
                raise
            return last

    def decide(self, text: str) -> Plan:
        """The router's plan for ``text``, blocking (it encodes the prompt, and may load or train the router)."""
        generation, skills = self.library_now()
        return self.policy.route(text, skills, generation)

    async def route(self, text: str) -> Plan:
        plan = await asyncio.to_thread(self.decide, text)
        metrics.ROUTER_DECISIONS.labels(decision=plan.kind).inc()
        return plan

    async def route_within(self, text: str, comp: Composition) -> Plan:
        """Weights for a context-aware composition from the prompt (α over its own skills)."""
        def decide() -> Plan:
            generation, skills = self.library_now()
            return self.policy.route_within(text, comp, skills, generation)

        t0 = time.perf_counter()
        plan = await asyncio.to_thread(decide)
        metrics.CONTEXT_WEIGHTS_SECONDS.observe(time.perf_counter() - t0)
        return plan


def open_registry(settings: Settings) -> Registry:
    client = connect(settings.redis_url, managed_dir=settings.data_dir / "redis" if settings.managed_redis else None)
    marks = HighWater.for_registry(settings.data_dir, settings.redis_url, settings.redis_prefix,
                                   accept_reset=settings.accept_registry_reset,
                                   reset_hint="start the server once with MOSAIC_ACCEPT_REGISTRY_RESET=true")
    return Registry(client, prefix=settings.redis_prefix, observer=metrics.registry_observer,
                    composition_cache_bytes=settings.composition_cache_mb << 20, high_water=marks)


def check_registry(registry: Registry, keys: KeyStore) -> None:
    """At start: a Redis behind what the data dir remembers (flushed, restored) stops the server here, unless
    MOSAIC_ACCEPT_REGISTRY_RESET is set (adapter_store/high_water.py); a Redis that is away is checked by
    each write instead."""
    try:
        registry.high_water.check_at_start(registry.r, registry.keys, keys)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        log.warning("registry not checked against the data dir's marks: %s", e)


def build(settings: Settings) -> Service:
    model_dir = prepare(settings, quiet=True)
    model_id = base_model_id(settings)
    spec = BaseModelSpec.from_dir(model_dir, model_id=model_id)
    registry = open_registry(settings)
    try:
        if done := {k: v for k, v in registry.upgrade().items() if v}:
            log.info("registry brought up to date: %s", done)
    except UnavailableError as e:  # the server starts without Redis, and serves what it can
        log.warning("registry not checked for older data: %s", e)
    keys = KeyStore(registry.r, prefix=settings.redis_prefix, high_water=registry.high_water)
    check_registry(registry, keys)
    engine = make_engine(settings, model_dir, model_id)
    budget = ComposeBudget(spec.shapes, settings=settings)  # the settings' limits, read at each check
    cache = AdapterCache(registry, settings.data_dir, max_rank=settings.max_lora_rank, budget=budget,
                         workers=settings.compose_workers, disk_bytes=settings.adapter_disk_mb << 20,
                         grace=settings.adapter_grace_seconds)
    return Service(settings, registry, spec, engine, cache, make_policy(settings, registry), model_dir, keys)


def make_policy(settings: Settings, registry: Registry) -> RouterPolicy:
    """The router policy the settings name (``MOSAIC_ROUTER``), with their thresholds."""
    return policies.make_policy(settings.router, settings.router_config(), registry)
