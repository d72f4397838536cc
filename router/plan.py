"""A plan says what serves a request: the base model, one skill, or a composition."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from composer.spec import Composition


class Plan(BaseModel):
    kind: Literal["base", "skill", "composition"]
    skill: str | None = None  # a skill reference (name or name@version) when kind == "skill"
    composition: Composition | None = None
    reason: str = ""
    scores: dict[str, float] = Field(default_factory=dict)  # the router's α per skill, when it decided
    similarity: dict[str, float] = Field(default_factory=dict)  # cosine of the prompt to each skill's nearest example
    # context-aware weights: α over the composition's own skills (aligned with composition.skills,
    # renormalised to sum to 1) from which the composition's weights were chosen for this prompt
    alpha: list[float] | None = None

    @property
    def active(self) -> list[tuple[str, float]]:
        """A composition's skills with a nonzero weight (context-aware weights drop skills to 0)."""
        if self.kind != "composition" or self.composition is None:
            return []
        return [(s, w) for s, w in zip(self.composition.skills, self.composition.resolved_weights) if w != 0]

    @property
    def skills(self) -> list[str]:
        if self.kind == "skill":
            return [self.skill or ""]
        if self.kind == "composition" and self.composition is not None:
            return list(self.composition.skills)
        return []
