"""Router policies: the content-aware choice behind ``model="auto"``.

A policy maps the request text and the current skill library to a :class:`Plan`. The default
here is lexical: TF-IDF over each skill's description and example prompts, cosine similarity
to the prompt, the best skill when it clears a threshold, else the base model. It is the
baseline the embedding router (MiniLM + a PSEC-style network) is measured against.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from adapter_store.registry import SkillInfo, parse_ref
from composer.spec import Composition
from router.plan import Plan
from router.weights import AlphaRule, contextual_plan, restrict


class RouterPolicy(Protocol):
    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        """The plan for ``model="auto"``: base, one skill, or a composition chosen from the library."""
        ...

    def route_within(self, text: str, comp: Composition, skills: Sequence[SkillInfo], generation: int) -> Plan:
        """The plan for a context-aware composition (``weights="auto"``): weights over its own skills."""
        ...


def routable(skills: Sequence[SkillInfo]) -> list[SkillInfo]:
    """The skills the router chooses among: every skill but context-aware compositions (a virtual model
    made of other skills would compete with its own inputs; it is served by name)."""
    return [s for s in skills if (s.composition or {}).get("weights") != "auto"]


class LexicalPolicy:
    def __init__(self, threshold: float = 0.2, rule: AlphaRule | None = None) -> None:
        self.threshold = threshold
        self.rule = rule or AlphaRule()
        self._fitted: tuple[int, tuple[str, ...], object, object] | None = None
        self._lock = threading.Lock()

    def _fit(self, skills: Sequence[SkillInfo], generation: int):
        from sklearn.feature_extraction.text import TfidfVectorizer

        key = tuple(s.ref for s in skills)
        with self._lock:
            if self._fitted and self._fitted[0] == generation and self._fitted[1] == key:
                return self._fitted[2], self._fitted[3]
            docs = [" ".join([s.description, *s.examples]) for s in skills]
            vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(docs)
            mat = vec.transform(docs)
            self._fitted = (generation, key, vec, mat)
            return vec, mat

    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        if not skills:
            return Plan(kind="base", reason="no skills are registered")
        if not text.strip():
            return Plan(kind="base", reason="the prompt is empty")
        vec, mat = self._fit(skills, generation)
        sims = (mat @ vec.transform([text[-4000:]]).T).toarray().ravel()
        scores = {s.name: round(float(x), 4) for s, x in zip(skills, sims)}
        best = int(sims.argmax())
        if sims[best] < self.threshold:
            return Plan(kind="base", reason=f"no skill scores above {self.threshold}", scores=scores)
        return Plan(kind="skill", skill=skills[best].name, reason="best lexical match", scores=scores)

    def route_within(self, text: str, comp: Composition, skills: Sequence[SkillInfo], generation: int) -> Plan:
        names = [parse_ref(ref)[0] for ref in comp.skills]
        if not skills or not text.strip():
            return contextual_plan(comp, [1.0 / len(names)] * len(names), None, self.rule,
                                   "nothing to compare: every skill at full strength")
        vec, mat = self._fit(skills, generation)
        sims = (mat @ vec.transform([text[-4000:]]).T).toarray().ravel()
        by_name = {s.name: float(x) for s, x in zip(skills, sims)}
        return contextual_plan(comp, restrict(by_name, names), [by_name.get(n, float("nan")) for n in names], self.rule)
