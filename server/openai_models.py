"""``/v1/models``: vLLM's model cards for the base model, every skill and ``auto``."""

from __future__ import annotations

from fastapi import Request

from adapter_store.errors import MosaicError
from adapter_store.validation import in_namespace
from server import auth
from server.library import page
from server.state import Service


async def model_list(service: Service, request: Request, after: str | None = None, limit: int | None = None) -> dict:
    """vLLM's ``ModelList`` of the base model, the skills the caller's key reaches (``parent`` = the base id,
    as vLLM's LoRA cards) and ``auto``; Mosaic's own fields under ``mosaic`` (a skill's details only for
    callers with ``read``). ``after`` and ``limit`` page through the skills (the base and ``auto`` cards come
    with the first page); ``has_more`` says whether more follow."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, ModelPermission

    ns = auth.namespace(request)
    skills, more = await page(service.registry, ns, after, limit)
    context = service.settings.max_model_len

    def card(id_: str, created: float, root: str, parent: str | None, mosaic: dict) -> ModelCard:
        return ModelCard(id=id_, created=int(created), owned_by="mosaic", root=root, parent=parent,
                         max_model_len=context, permission=[ModelPermission()], mosaic=mosaic)

    # a skill's details (content, rank, description) are the library's: shown to callers who may read it
    # (a key limited to a namespace: that namespace's)
    try:
        read_ns, detail = auth.check(service, "read", request.headers, request.client.host if request.client else None), True
    except MosaicError:
        read_ns, detail = None, False
    first = not after  # the base and auto cards lead the first page
    cards = [card(service.base_id, service.started, service.base_id, None, {"kind": "base"})] if first else []
    cards += [card(s.name, s.created, s.ref, service.base_id,
                   {"kind": "skill", "version": s.version,
                    **({"content_id": s.content_id, "rank": s.rank, "description": s.description}
                       if detail and (read_ns is None or in_namespace(s.name, read_ns)) else {})})
              for s in skills]
    if ns is None and first:  # a key limited to a namespace cannot route over the whole library
        cards.append(card("auto", service.started, "auto", service.base_id, {"kind": "router"}))
    return ModelList(data=cards).model_dump() | {"has_more": more}
