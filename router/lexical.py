"""The lexical policy: TF-IDF over each skill's description and example prompts, cosine similarity to
the prompt, the best skill when it clears ``lexical_min``, else the base model. It is the baseline the
embedding router (router/psec.py) is measured against, and needs no model download."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo, parse_ref
from composer.spec import Composition
from router.plan import Plan
from router.policy import RouterConfig, nothing_to_route
from router.weights import contextual_plan, restrict

PROMPT_CHARS = 4000  # the prompt's tail that is compared


class LexicalPolicy:
    name = "lexical"

    def __init__(self, config: RouterConfig, registry: Registry | None = None) -> None:
        self.config = config
        self._fitted: tuple[int, tuple[str, ...], object, object] | None = None
        self._lock = threading.Lock()

    def _similarities(self, text: str, skills: Sequence[SkillInfo], generation: int):
        from sklearn.feature_extraction.text import TfidfVectorizer

        key = tuple(s.ref for s in skills)
        with self._lock:
            if not (self._fitted and self._fitted[0] == generation and self._fitted[1] == key):
                docs = [" ".join([s.description, *s.examples]) for s in skills]
                vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(docs)
                self._fitted = (generation, key, vectorizer, vectorizer.transform(docs))
            vectorizer, profiles = self._fitted[2], self._fitted[3]
        return (profiles @ vectorizer.transform([text[-PROMPT_CHARS:]]).T).toarray().ravel()

    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        if plan := nothing_to_route(text, skills):
            return plan
        sims = self._similarities(text, skills, generation)
        scores = {s.name: round(float(x), 4) for s, x in zip(skills, sims)}
        best = int(sims.argmax())
        if sims[best] < self.config.lexical_min:
            return Plan(kind="base", reason=f"no skill scores above {self.config.lexical_min}", scores=scores)
        return Plan(kind="skill", skill=skills[best].name, reason="best lexical match", scores=scores)

    def route_within(self, text: str, comp: Composition, skills: Sequence[SkillInfo], generation: int) -> Plan:
        names = [parse_ref(ref)[0] for ref in comp.skills]
        if not skills or not text.strip():
            return contextual_plan(comp, [1.0 / len(names)] * len(names), None, self.config.rule,
                                   "nothing to compare: every skill at full strength")
        sims = self._similarities(text, skills, generation)
        by_name = {s.name: float(x) for s, x in zip(skills, sims)}
        return contextual_plan(comp, restrict(by_name, names), [by_name.get(n, float("nan")) for n in names],
                               self.config.rule)
