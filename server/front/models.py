"""``/v1/models``: vLLM's model cards for the base model, the skills the caller may read, and ``auto``."""

from __future__ import annotations

from fastapi import Request

from server.core.state import Service
from server.edge import auth
from server.jobs.library import page


async def model_list(service: Service, request: Request, after: str | None = None, limit: int | None = None) -> dict:
    """vLLM's ``ModelList`` of the base model, the skills (``parent`` = the base id, as vLLM's LoRA cards;
    Mosaic's own fields under ``mosaic``) and ``auto``. The skills are the library's: listed to callers
    who may read it (a key limited to a namespace: that namespace's), and to no one else (server/edge/auth.py,
    "What inference shows of the library"). ``after`` and ``limit`` page through the skills (the base and
    ``auto`` cards come with the first page); ``has_more`` says whether more follow."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, ModelPermission

    context = service.settings.max_model_len

    def card(id_: str, created: float, root: str, parent: str | None, mosaic: dict) -> ModelCard:
        return ModelCard(id=id_, created=int(created), owned_by="mosaic", root=root, parent=parent,
                         max_model_len=context, permission=[ModelPermission()], mosaic=mosaic)

    reads, read_ns = auth.may_read(service, request.scope)
    skills, more = await page(service.registry, read_ns, after, limit) if reads else ([], False)
    first = not after  # the base and auto cards lead the first page
    cards = [card(service.base_id, service.started, service.base_id, None, {"kind": "base"})] if first else []
    cards += [card(s.name, s.created, s.ref, service.base_id,
                   {"kind": "skill", "version": s.version, "content_id": s.content_id, "rank": s.rank,
                    "description": s.description})
              for s in skills]
    if auth.namespace(request) is None and read_ns is None and first:  # a namespace's key cannot route over all
        cards.append(card("auto", service.started, "auto", service.base_id, {"kind": "router"}))
    return ModelList(data=cards).model_dump() | {"has_more": more}
