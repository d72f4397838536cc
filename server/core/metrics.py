"""Prometheus metrics (served at /metrics).

``target`` labels name what served a request: the skill's name (without version) for a skill,
``composition`` for any composition, the base model's id for the base. One label value per skill:
fine for libraries of hundreds of skills; past that, aggregate by plan only (``mosaic_requests_total``).
"""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("mosaic_requests_total", "Inference requests by plan kind and outcome", ["plan", "outcome"])
LATENCY = Histogram("mosaic_request_seconds", "Inference request latency (to the last token)", ["plan"])
TARGET_REQUESTS = Counter("mosaic_target_requests_total", "Inference requests per skill (or composition/base)", ["target", "outcome"])
TARGET_TOKENS = Counter("mosaic_target_tokens_total", "Tokens per skill (or composition/base)", ["target", "kind"])
TARGET_LATENCY = Histogram("mosaic_target_request_seconds", "Inference latency per skill (or composition/base)", ["target"])
COMPOSITIONS = Counter("mosaic_composition_cache_total", "Composition cache lookups", ["result"])
COMPOSE_SECONDS = Histogram("mosaic_compose_seconds", "Time to compute a composition (cache misses)",
                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
ROUTER_DECISIONS = Counter("mosaic_router_decisions_total", "model='auto' decisions by outcome", ["decision"])
CONTEXT_WEIGHTS_SECONDS = Histogram("mosaic_context_weights_seconds",
                                    "Time to choose a context-aware composition's weights from the prompt",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
REGISTRY_OPS = Counter("mosaic_registry_operations_total", "Registry (Redis) operations by outcome", ["op", "outcome"])


def registry_observer(op: str, outcome: str) -> None:
    """Passed to the Registry: counts every operation and its outcome (ok / unavailable / error)."""
    REGISTRY_OPS.labels(op=op, outcome=outcome).inc()
