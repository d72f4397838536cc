"""The router policies by name (``MOSAIC_ROUTER``), as composer/registry.py names the merge methods."""

from __future__ import annotations

from collections.abc import Callable

from adapter_store.registry import Registry
from router.lexical import LexicalPolicy
from router.policy import RouterConfig, RouterPolicy
from router.psec import PsecRouter

POLICIES: dict[str, Callable[[RouterConfig, Registry | None], RouterPolicy]] = {
    PsecRouter.name: PsecRouter,
    LexicalPolicy.name: LexicalPolicy,
}


def make_policy(name: str, config: RouterConfig, registry: Registry | None = None) -> RouterPolicy:
    try:
        return POLICIES[name](config, registry)
    except KeyError:
        raise ValueError(f"unknown router policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
