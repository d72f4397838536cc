"""Mosaic's own models at the OpenAI front: the ``mosaic`` field of responses and ``/v1/route``'s request.
The OpenAI request and response models themselves are vLLM's (``vllm.entrypoints.openai``): see
server/front/endpoints.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from composer.spec import Composition


class MosaicInfo(BaseModel):
    """What served the request: the ``mosaic`` field of a response (the first event of a stream) and
    the ``x-mosaic-plan`` header."""

    model_config = ConfigDict(extra="allow")
    plan: Literal["base", "skill", "composition"]
    skills: list[str] = Field(default_factory=list)
    weights: list[float] = Field(default_factory=list)
    method: str | None = None
    cache: Literal["hit", "miss"] | None = None
    rank: int | None = None
    refactored: bool = False
    reason: str | None = None
    scores: dict[str, float] | None = None
    # context-aware compositions: α over the composition's skills (renormalised) and where the weights came from
    alpha: dict[str, float] | None = None
    weights_from: Literal["auto"] | None = None


class RouteRequest(BaseModel):
    prompt: str | None = Field(default=None, description="the text to route")
    messages: list[dict] | None = Field(default=None, description="or chat messages (the last user turn is routed)")
    composition: Composition | None = Field(
        default=None, description="a context-aware composition (weights 'auto'): its weights for this prompt")
    model: str | None = Field(default=None, description="a stored context-aware composition: its weights for this prompt")


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text of its parts (images and the like add none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and "text" in p)
