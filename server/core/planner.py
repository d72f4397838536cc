"""From a request's ``model`` (base id, ``name``, ``name@N``, ``auto``) or ``composition`` to a plan, and
from a plan to the adapter that serves it (materialised and cached by :class:`AdapterCache`)."""

from __future__ import annotations

import asyncio

from adapter_store.skill_info import SkillInfo
from adapter_store.validation import in_namespace
from composer.spec import Composition
from lora.errors import ForbiddenError, NotFoundError, UnavailableError
from router.plan import Plan
from server.core import metrics
from server.core.compose_budget import check_composition
from server.core.adapter_cache import Target
from server.core.engine import EngineAdapter
from server.core.protocol import MosaicInfo
from server.core.state import Service


PLANNED = "mosaic.plan"  # ASGI scope key: the plan made for this request upstream (the Ray ingress), served as is


async def plan_for(service: Service, model: str, composition: Composition | None, text: str,
                   namespace: str | None = None) -> Plan:
    """Explicit plans (base, a named skill, a composition) and ``auto`` (the router's choice).
    A context-aware composition (``weights="auto"``), given in the request or stored under a name,
    gets its weights from ``text``. With a ``namespace`` (the key's), only that namespace's skills."""
    if namespace is not None:
        outside = [s for s in (composition.skills if composition is not None else ())
                   if not in_namespace(s, namespace)]
        if composition is None and model not in ("auto", service.base_id) and not in_namespace(model, namespace):
            outside.append(model)
        if outside:
            raise ForbiddenError(f"this API key reaches only skills named '{namespace}/…', not "
                                 f"{', '.join(map(repr, outside))}", param="composition" if composition else "model")
        if composition is None and model == "auto":
            raise ForbiddenError(f"this API key is limited to the namespace '{namespace}'; 'auto' chooses among the "
                                 "whole library: send a composition with weights 'auto' over your skills", param="model")
    if composition is not None:
        check_composition(service.settings, composition)
        if composition.context_aware:
            for ref in composition.skills:  # every skill must exist, even one this prompt will leave out
                await service.cache.resolve(ref)
            return await service.route_within(text, composition)
        return Plan(kind="composition", composition=composition, reason="composition given in the request")
    if model == "auto":
        return await service.route(text)
    if model == service.base_id:
        return Plan(kind="base", reason="base model requested")
    try:
        info = await asyncio.to_thread(service.registry.info, model)
    except UnavailableError:
        if not service.cache.knows(model):
            raise
        info = None  # served before: keeps serving from its local folder while Redis is away
    except NotFoundError:
        raise NotFoundError(f"the model {model!r} does not exist: use the base model {service.base_id!r}, a skill name, or 'auto'",
                            param="model") from None
    if info is not None and (template := stored_template(info)) is not None:
        if namespace is not None and (outside := [s for s in template.skills if not in_namespace(s, namespace)]):
            raise ForbiddenError(f"{info.ref} composes skills outside the namespace '{namespace}' "
                                 f"({len(outside)} of {len(template.skills)}), which this API key does not reach",
                                 param="model")
        plan = await service.route_within(text, template)
        return plan.model_copy(update={"reason": f"{info.ref} is context-aware: {plan.reason}"})
    return Plan(kind="skill", skill=model, reason="skill requested by name")


def stored_template(info: SkillInfo) -> Composition | None:
    """The context-aware composition a stored skill stands for (its pinned skills, method, rank), or None."""
    stored = info.composition or {}
    if stored.get("weights") != "auto":
        return None
    return Composition.model_validate({k: v for k, v in stored.items() if k in Composition.model_fields})


async def target_for(service: Service, plan: Plan) -> Target | None:
    """The one decision of which adapter serves ``plan`` (None: the base model), made here for the server, the
    Ray ingress and the quality report alike. A context-aware plan leaves out the skills whose weight came out 0;
    one left is served alone, exactly."""
    cache = service.cache
    if plan.kind == "base":
        return None
    if plan.kind == "skill":
        return cache.skill_target(await cache.resolve(plan.skill))
    comp = plan.composition
    if plan.alpha is not None:
        active = plan.active
        if len(active) == 1:
            return cache.skill_target(await cache.resolve(active[0][0]))
        skills, weights = zip(*active)
        comp = comp.model_validate({**comp.model_dump(), "skills": skills, "weights": weights})
    return cache.composition_target(comp, [await cache.resolve(ref) for ref in comp.skills])


async def serve_plan(service: Service, plan: Plan) -> tuple[EngineAdapter | None, MosaicInfo]:
    """The adapter that serves ``plan`` (None: the base model), and what served it (the ``mosaic`` field)."""
    info = {"plan": plan.kind, "reason": plan.reason, "scores": plan.scores or None}
    target = await target_for(service, plan)
    if target is None:
        return None, MosaicInfo(**info)
    served = await service.cache.serve(target)
    if plan.alpha is not None:
        info |= {"alpha": dict(zip(plan.composition.skills, plan.alpha)), "weights_from": "auto",
                 "template": {"skills": list(plan.composition.skills), "method": plan.composition.method}}
    if served.cache is not None:
        metrics.COMPOSITIONS.labels(result=served.cache).inc()
    return served.adapter, MosaicInfo(**info, **served.describe())
