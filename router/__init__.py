"""The router room: from a request to a plan (base, one skill, or a composition)."""

from router.plan import Plan
from router.policy import LexicalPolicy, RouterPolicy

__all__ = ["LexicalPolicy", "Plan", "RouterPolicy"]
