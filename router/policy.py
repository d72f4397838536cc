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

from adapter_store.registry import SkillInfo
from router.plan import Plan


class RouterPolicy(Protocol):
    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan: ...


class LexicalPolicy:
    def __init__(self, threshold: float = 0.2) -> None:
        self.threshold = threshold
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
