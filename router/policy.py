"""Router policies: the content-aware choice behind ``model="auto"``.

A policy maps the request text and the current skill library to a :class:`Plan`. Every policy has
the same constructor (``config``, ``registry``) and the same two methods; :data:`router.policies.POLICIES`
names them (``MOSAIC_ROUTER``), and tests/router/test_policy_contract.py holds each to this contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from adapter_store.skill_info import SkillInfo
from composer.spec import Composition
from router.plan import Plan
from router.weights import AlphaRule


@dataclass(frozen=True)
class RouterConfig:
    """Every policy's decision thresholds. The values live in one place, the server's settings
    (``MOSAIC_ROUTER_*``, :meth:`server.core.settings.Settings.router_config`), measured by bench/route.py."""

    ood: float  # the best skill's similarity below this: out of distribution, serve the base model
    mix_similarity: float  # another skill joins the top one when the prompt is this close to it too
    mix_min: float  # ... and its α is at least this
    lexical_min: float  # the lexical policy's TF-IDF cosine below which it serves the base model
    rule: AlphaRule  # α -> weights: the grid and the most skills with a nonzero weight
    # how long a request waits for the router retrained after a library change before it routes with the
    # model it has (None: until the new one is ready)
    train_wait_seconds: float | None = None
    # retrieve-then-compose (router/retrieval.py): α among the top_k skills nearest the prompt; a library of
    # at most lr_max_skills gets the trained network's α (restricted to them), a larger one a softmax of the
    # candidates' similarities at this temperature (no fit that grows with the library)
    top_k: int = 16
    lr_max_skills: int = 200
    temperature: float = 0.1


class RouterPolicy(Protocol):
    name: str

    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        """The plan for ``model="auto"``: base, one skill, or a composition chosen from ``skills``.
        ``generation`` is the registry's generation the list was read at (a policy may cache by it)."""
        ...

    def route_within(self, text: str, comp: Composition, skills: Sequence[SkillInfo], generation: int) -> Plan:
        """The plan for a context-aware composition (``weights="auto"``): weights over its own skills."""
        ...


def is_routable(skill: SkillInfo) -> bool:
    """Whether the router chooses among this skill: every skill but context-aware compositions (a virtual
    model made of other skills would compete with its own inputs; it is served by name)."""
    return (skill.composition or {}).get("weights") != "auto"


def routable(skills: Sequence[SkillInfo]) -> list[SkillInfo]:
    """The skills the router chooses among (:func:`is_routable`)."""
    return [s for s in skills if is_routable(s)]


def nothing_to_route(text: str, skills: Sequence[SkillInfo]) -> Plan | None:
    """The base-model plan every policy gives when there is nothing to decide on, else None."""
    if not skills:
        return Plan(kind="base", reason="no skills are registered")
    if not text or not text.strip():
        return Plan(kind="base", reason="the prompt is empty")
    return None
