"""The router room: from a request to a plan (base, one skill, or a composition)."""

from router.plan import Plan
from router.policy import RouterConfig, RouterPolicy

__all__ = ["Plan", "RouterConfig", "RouterPolicy"]
