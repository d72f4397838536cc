"""From the router's α to composition weights: the rule shared by ``model="auto"`` and
context-aware compositions (``"weights": "auto"``).

PSEC merges Σ α_i(x) ΔW_i. Normalising α to sum to 1 runs a two-skill mix at about half strength
each, and a skill at half strength loses most of what it does on the 135M base model. So the
strongest skill always runs at full strength: w_i = α_i / max_j α_j. Then

* only the ``max_skills`` largest weights are kept (top-k), and
* every weight is rounded to a multiple of ``grid``; a skill whose α is below ``grid / 2`` of the
  strongest drops out, so a dominant skill is served alone (its own adapter, exactly).

The grid bounds the number of distinct materialisations of a K-skill composition by
k · C(K, k) · (1/grid + 1)^(k-1) with k = min(K, max_skills) (which skills, which is strongest, the others), so the composition cache keeps hitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from composer.spec import Composition
from router.plan import Plan


@dataclass(frozen=True)
class AlphaRule:
    grid: float = 0.25  # weights are multiples of this; below grid/2 of the strongest -> 0
    max_skills: int = 3  # at most this many skills with a nonzero weight

    def __post_init__(self) -> None:
        if not 0 < self.grid <= 1:
            raise ValueError(f"grid must lie in (0, 1], got {self.grid}")
        if self.max_skills < 1:
            raise ValueError(f"max_skills must be at least 1, got {self.max_skills}")


def weights_from_alpha(alpha: Sequence[float], rule: AlphaRule = AlphaRule()) -> list[float]:
    """Weights for skills with router scores ``alpha`` (any non-negative scale): the strongest at 1.0,
    the others α_i / α_max on the rule's grid, all but the ``max_skills`` largest at 0."""
    a = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, None)
    if a.size == 0:
        return []
    top = a.max()
    if not np.isfinite(top) or top <= 0:  # no information: every skill at full strength
        a, top = np.ones_like(a), 1.0
    w = a / top
    if a.size > rule.max_skills:
        keep = np.argsort(-w, kind="stable")[: rule.max_skills]
        mask = np.zeros_like(w, dtype=bool)
        mask[keep] = True
        w = np.where(mask, w, 0.0)
    steps = np.floor(w / rule.grid + 0.5)  # round half up, so the strongest (w = 1) stays exactly 1
    return [round(float(s * rule.grid), 6) for s in np.minimum(steps, round(1 / rule.grid))]


def restrict(alpha: dict[str, float], names: Sequence[str]) -> list[float]:
    """α over ``names`` only, renormalised to sum to 1 (for a softmax router this is the softmax over
    those classes alone). Names the router does not know get the mean of the others (or 1)."""
    known = [alpha[n] for n in names if n in alpha]
    fill = float(np.mean(known)) if known else 1.0
    sub = np.array([max(alpha.get(n, fill), 0.0) for n in names], dtype=np.float64)
    total = sub.sum()
    sub = sub / total if total > 0 else np.full(len(names), 1.0 / len(names))
    return [float(x) for x in sub]


def contextual_plan(comp: Composition, alpha: Sequence[float], similarity: Sequence[float] | None,
                    rule: AlphaRule, why: str = "") -> Plan:
    """The plan for a context-aware composition given α over its own skills (aligned with
    ``comp.skills``): the concrete composition with :func:`weights_from_alpha`'s weights."""
    weights = weights_from_alpha(alpha, rule)
    concrete = comp.with_weights(weights)
    kept = [f"{s} (α={a:.2f}, w={w:g})" for s, a, w in zip(comp.skills, alpha, weights) if w]
    alone = len(kept) == 1
    reason = (why + "; " if why else "") + ("dominant skill served alone: " if alone else "context-aware weights: ") + ", ".join(kept)
    return Plan(kind="composition", composition=concrete, reason=reason, alpha=[round(float(a), 4) for a in alpha],
                scores={s: round(float(a), 4) for s, a in zip(comp.skills, alpha)},
                similarity={s: round(float(x), 4) for s, x in zip(comp.skills, similarity or []) if np.isfinite(x)})
