"""Prometheus metrics (served at /metrics)."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("mosaic_requests_total", "Inference requests by plan kind and outcome", ["plan", "outcome"])
COMPOSITIONS = Counter("mosaic_composition_cache_total", "Composition cache lookups", ["result"])
LATENCY = Histogram("mosaic_request_seconds", "Inference request latency (to the last token)", ["plan"])
