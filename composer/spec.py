"""What a composition is: a frozen spec whose content hash names its result everywhere."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from composer.registry import MAX_SKILLS, METHODS, get_method


class Composition(BaseModel):
    """(skills, weights, method, params, rank). ``weights`` default to 1.0 each (every skill at
    full strength, plain task arithmetic); ``rank`` None means exact (no re-factoring).

    ``weights="auto"`` makes the composition context-aware: it is a template whose weights are
    chosen per request from the prompt (by the router, over these skills only). Such a spec has no
    content of its own: :meth:`with_weights` turns it into the concrete composition to build."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    skills: tuple[str, ...] = Field(min_length=1, max_length=MAX_SKILLS)
    weights: tuple[float, ...] | Literal["auto"] | None = Field(
        default=None, description="one weight per skill (default 1 each), or 'auto': chosen per request from the prompt"
    )
    method: str = "linear"
    params: dict[str, Any] = Field(default_factory=dict)
    rank: int | None = Field(default=None, ge=1, le=4096)
    weighting: Literal["none", "varm"] = Field(default="none", description="'varm': per-module weights from each skill's ‖ΔW‖²")
    lines: tuple[float, float] | None = Field(default=None, description="LiNeS (α, β): layer ℓ scaled by α + β(ℓ−1)/(L−1)")

    @field_validator("rank", mode="before")
    @classmethod
    def _auto_rank(cls, v: Any) -> Any:
        return None if v in ("auto", "") else v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {', '.join(sorted(METHODS))}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Composition":
        if self.weights is not None and self.weights != "auto":
            if len(self.weights) != len(self.skills):
                raise ValueError(f"{len(self.skills)} skills but {len(self.weights)} weights")
            if not all(math.isfinite(w) for w in self.weights):
                raise ValueError("weights must be finite numbers")
        get_method(self.method).check_params(self.params)
        get_method(self.method).check_inputs(len(self.skills))
        return self

    @property
    def context_aware(self) -> bool:
        """Whether the weights are chosen per request (``weights="auto"``)."""
        return self.weights == "auto"

    @property
    def resolved_weights(self) -> tuple[float, ...]:
        if self.context_aware:
            raise ValueError("a context-aware composition has no weights until a prompt chooses them (with_weights)")
        return self.weights if self.weights is not None else tuple(1.0 for _ in self.skills)

    def with_weights(self, weights: tuple[float, ...] | list[float]) -> "Composition":
        """The concrete composition with these weights (same skills, method, params, rank)."""
        return type(self).model_validate({**self.model_dump(), "weights": tuple(float(w) for w in weights)})

    @property
    def resolved_params(self) -> dict[str, Any]:
        return get_method(self.method).check_params(self.params)

    def compose_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`composer.compose` this spec stands for (besides adapters)."""
        return {"weights": list(self.resolved_weights), "method": self.method, "params": self.resolved_params,
                "rank": self.rank, "weighting": self.weighting, "lines": self.lines}

    def content_key(self, skill_hashes: list[str], max_rank: int | None = None) -> str:
        """Hash of (each skill's content id, weights, method, params, rank, and the engine's rank limit
        that the result was cut to, if any): names of skills do not enter, so renaming changes nothing
        and a new version always changes the key."""
        doc = {
            "v": 1,
            "skills": list(skill_hashes),
            "weights": [float(w) for w in self.resolved_weights],
            "method": self.method,
            "params": self.resolved_params,
            "rank": self.rank,
            "weighting": self.weighting,
            "lines": list(self.lines) if self.lines else None,
        }
        if max_rank is not None:
            doc["max_rank"] = int(max_rank)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
