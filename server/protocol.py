"""Mosaic's own fields in OpenAI responses. The OpenAI request and response models themselves are vLLM's
(``vllm.entrypoints.openai``): see server/openai_api.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text of its parts (images and the like add none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and "text" in p)
