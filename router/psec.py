"""The context-aware router: MiniLM embeddings + a PSEC-style compositional network.

PSEC composes skills in parameter space with weights α(x) from a small network over the input.
Here the input is the prompt's embedding, and the network is a multinomial logistic regression
(scikit-learn) trained on every skill's example prompts and description. Its probabilities are
the α over skills. The decision rule turns (α, similarities) into a plan (the names are :class:`router.policy.RouterConfig`'s):

* no skills, or an empty prompt                          -> base model (with the reason)
* the prompt is far from every skill (max similarity < ``ood``) -> base model
* the top skill by α, joined by every other skill the prompt is
  also close to (similarity ≥ ``mix_similarity``, α ≥ ``mix_min``) -> one skill, or a `psec`
  composition of up to ``rule.max_skills`` weighted by :func:`router.weights.weights_from_alpha`
  (the strongest at full strength, the others α_i / α_max on a grid)

A context-aware composition (``"weights": "auto"``) asks :meth:`PsecRouter.route_within`: the same
α, restricted to the composition's own skills, through the same weight rule.

Similarity is the cosine of the prompt to a skill's nearest profile text. The thresholds
(:class:`router.policy.RouterConfig`) come from the server's settings; bench/route.py measures where
they sit between held-out, two-skill and out-of-distribution prompts (bench/reports/REPORT.md).

The trained model is stored in Redis next to the library, keyed by a hash of every skill's
profile, so restarts and other replicas load it instead of retraining; example embeddings are
cached by text. Any change to the library changes the key and retrains (seconds at most).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from redis.exceptions import LockNotOwnedError
from sklearn.linear_model import LogisticRegression

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo, parse_ref
from composer.spec import Composition
from router.encoder import Encoder, MiniLMEncoder
from router.plan import Plan
from router.policy import RouterConfig, nothing_to_route
from router.weights import contextual_plan, restrict, weights_from_alpha

MODEL_KEY = "router-model"
EMB_KEY = "router-embeddings"
TRAIN_LOCK = "router-training"  # one replica trains at a time; the others wait for its model
TRAIN_LOCK_SECONDS = 600  # a trainer that died frees the lock after this


def _profile_texts(s: SkillInfo) -> list[str]:
    texts = [e for e in s.examples if e.strip()]
    if s.description.strip():
        texts.append(s.description)
    return texts or [s.name.replace("_", " ").replace("-", " ")]


def profile_key(skills: Sequence[SkillInfo], encoder: str) -> str:
    doc = [encoder] + [[s.name, s.sha256, s.description, s.examples] for s in sorted(skills, key=lambda s: s.name)]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


@dataclass
class RouterModel:
    key: str
    names: list[str]
    X: np.ndarray  # profile embeddings (n × d), unit norm
    y: np.ndarray  # skill index of each row
    coef: np.ndarray | None = None  # (classes × d); None with a single skill
    intercept: np.ndarray | None = None
    trained_seconds: float = 0.0

    def alpha(self, e: np.ndarray) -> np.ndarray:
        if self.coef is None:
            return np.ones(len(self.names))
        logits = self.coef @ e + self.intercept
        if logits.ndim == 0 or len(self.names) == 2 and self.coef.shape[0] == 1:  # binary LR: one logit
            p1 = 1 / (1 + np.exp(-float(np.atleast_1d(logits)[0])))
            return np.array([1 - p1, p1])
        z = np.exp(logits - logits.max())
        return z / z.sum()

    def similarity(self, e: np.ndarray) -> np.ndarray:
        """Per skill, the cosine to its nearest profile text."""
        sims = self.X @ e
        out = np.full(len(self.names), -1.0)
        np.maximum.at(out, self.y, sims)
        return out

    def to_redis(self) -> dict[str, bytes | str]:
        buf = io.BytesIO()
        arrays = {"X": self.X, "y": self.y}
        if self.coef is not None:
            arrays |= {"coef": self.coef, "intercept": self.intercept}
        np.savez(buf, **arrays)
        return {"key": self.key, "names": json.dumps(self.names), "arrays": buf.getvalue(),
                "trained_seconds": str(self.trained_seconds)}

    @classmethod
    def from_redis(cls, raw: dict[str, bytes]) -> "RouterModel":
        z = np.load(io.BytesIO(raw["arrays"]))
        return cls(key=raw["key"].decode(), names=json.loads(raw["names"]), X=z["X"], y=z["y"],
                   coef=z["coef"] if "coef" in z else None, intercept=z["intercept"] if "intercept" in z else None,
                   trained_seconds=float(raw.get("trained_seconds", b"0")))


class PsecRouter:
    """A :class:`router.policy.RouterPolicy` over an encoder, stored in the registry's Redis."""

    name = "psec"

    def __init__(self, config: RouterConfig, registry: Registry | None = None, *, encoder: Encoder | None = None,
                 C: float = 10.0) -> None:
        self.config = config
        self.registry = registry
        self.encoder = encoder or MiniLMEncoder()
        self.C = C
        self._model: RouterModel | None = None
        self._key: tuple[Sequence[SkillInfo], str] | None = None
        self._changed = threading.Condition()  # guards the four below; notified when a model (or an error) arrives
        self._wanted: tuple[str, Sequence[SkillInfo]] | None = None
        self._trainer: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- training -----------------------------------------------------------------
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings with a Redis cache keyed by (encoder, text)."""
        keys = [hashlib.sha1(f"{self.encoder.name}\0{t}".encode()).hexdigest() for t in texts]
        cached = self.registry.aux.get(EMB_KEY, keys) if self.registry else {}
        missing = [i for i, k in enumerate(keys) if k not in cached]
        out = {k: np.frombuffer(v, dtype=np.float32) for k, v in cached.items()}
        if missing:
            fresh = self.encoder.encode([texts[i] for i in missing])
            for i, row in zip(missing, fresh):
                out[keys[i]] = row
            if self.registry:
                self.registry.aux.add_fields(EMB_KEY, {keys[i]: out[keys[i]].tobytes() for i in missing})
        return np.stack([out[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)

    def train(self, skills: Sequence[SkillInfo]) -> RouterModel:
        t0 = time.perf_counter()
        skills = sorted(skills, key=lambda s: s.name)
        texts, labels = [], []
        for i, s in enumerate(skills):
            for t in _profile_texts(s):
                texts.append(t)
                labels.append(i)
        X, y = self._embed(texts), np.array(labels)
        model = RouterModel(key=profile_key(skills, self.encoder.name), names=[s.name for s in skills], X=X, y=y)
        if len(skills) >= 2:
            clf = LogisticRegression(C=self.C, max_iter=2000).fit(X, y)
            model.coef, model.intercept = clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)
        model.trained_seconds = time.perf_counter() - t0
        if self.registry:
            self.registry.aux.put(MODEL_KEY, model.to_redis())
        return model

    def model_for(self, skills: Sequence[SkillInfo]) -> RouterModel:
        """The model for ``skills``: this process's, the one in Redis (another replica trained it), or a new
        one. Training runs in one background thread here, and on one replica at a time (a Redis lock); a
        request waits for it at most ``config.train_wait_seconds`` (None: until it is done), then routes with
        the model it has (:meth:`route` leaves out skills that model knows and the library no longer has).
        With no model yet, it waits."""
        # the same list object (the server re-reads the library only when it changes) has the same key
        cached = self._key
        key = cached[1] if cached is not None and cached[0] is skills else profile_key(skills, self.encoder.name)
        self._key = (skills, key)
        with self._changed:
            if self._model is not None and self._model.key == key:
                return self._model
            self._wanted = (key, skills)
            if self._trainer is None or not self._trainer.is_alive():
                self._error = None
                self._trainer = threading.Thread(target=self._train_wanted, name="router-train", daemon=True)
                self._trainer.start()
            wait = self.config.train_wait_seconds if self._model is not None else None
            self._changed.wait_for(lambda: self._model is not None and self._model.key == key or self._error is not None,
                                   timeout=wait)
            if self._model is None:
                raise self._error
            return self._model

    def _train_wanted(self) -> None:
        """The trainer thread: until this process has the model of the library last asked for."""
        while True:
            with self._changed:
                key, skills = self._wanted
                if self._model is not None and self._model.key == key:
                    return
            try:
                model = self._obtain(key, skills)
            except BaseException as e:  # the waiters raise it (the thread reports it too)
                with self._changed:
                    self._error = e
                    self._changed.notify_all()
                raise
            with self._changed:
                self._model = model
                self._changed.notify_all()

    def _obtain(self, key: str, skills: Sequence[SkillInfo]) -> RouterModel:
        """The model with ``key``: from Redis if a replica stored it, else trained here under the training lock
        (a replica that finds the lock taken waits for the holder's model)."""
        if self.registry is None:
            return self.train(skills)
        lock = self.registry.aux.lock(TRAIN_LOCK, seconds=TRAIN_LOCK_SECONDS)
        while True:
            if (stored := self._stored(key)) is not None:
                return stored
            if lock.acquire(blocking=True, blocking_timeout=1.0):
                break
        try:
            return self._stored(key) or self.train(skills)
        finally:
            with contextlib.suppress(LockNotOwnedError):  # it expired (or Redis lost it): the model stands
                lock.release()

    def _stored(self, key: str) -> RouterModel | None:
        if self.registry.aux.get(MODEL_KEY, ["key"]).get("key", b"").decode() != key:
            return None
        stored = self.registry.aux.get(MODEL_KEY)
        return RouterModel.from_redis(stored) if stored.get("key", b"").decode() == key else None

    # ---- deciding -----------------------------------------------------------------
    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        if plan := nothing_to_route(text, skills):
            return plan
        c = self.config
        model = self.model_for(skills)
        e = self.encoder.encode([text])[0].astype(np.float64)
        alpha, sims = self._live(model, skills, model.alpha(e), model.similarity(e))
        order = np.argsort(-alpha)
        scores = {n: round(float(a), 4) for n, a in zip(model.names, alpha)}
        similarity = {n: round(float(s), 4) for n, s in zip(model.names, sims)}
        top = int(order[0])
        if sims.max() < c.ood:
            return Plan(kind="base", reason=f"out of distribution: similarity {sims.max():.2f} to the nearest skill "
                        f"is below {c.ood}", scores=scores, similarity=similarity)
        chosen = [top] + [int(i) for i in order[1:] if sims[i] >= c.mix_similarity and alpha[i] >= c.mix_min]
        chosen = chosen[: c.rule.max_skills]
        w = weights_from_alpha(alpha[chosen], c.rule)
        chosen, w = [i for i, x in zip(chosen, w) if x], [x for x in w if x]
        if len(chosen) >= 2:
            comp = Composition(skills=tuple(model.names[i] for i in chosen), weights=tuple(w), method="psec")
            return Plan(kind="composition", composition=comp, reason="the prompt asks for several skills: "
                        + ", ".join(f"{model.names[i]} (α={alpha[i]:.2f}, similarity {sims[i]:.2f}, w={x:g})"
                                    for i, x in zip(chosen, w)),
                        scores=scores, similarity=similarity)
        return Plan(kind="skill", skill=model.names[top], reason=f"{model.names[top]} (α={alpha[top]:.2f}, similarity {sims[top]:.2f})", scores=scores,
                    similarity=similarity)

    @staticmethod
    def _live(model: RouterModel, skills: Sequence[SkillInfo], alpha: np.ndarray,
              sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """α and similarities with the skills the library no longer has left out (a model trained before the
        library changed, while the new one trains)."""
        have = {s.name for s in skills}
        live = np.array([n in have for n in model.names])
        alpha = np.where(live, alpha, 0.0)
        return (alpha / alpha.sum() if alpha.sum() > 0 else alpha), np.where(live, sims, -1.0)

    def route_within(self, text: str, comp: Composition, skills: Sequence[SkillInfo], generation: int) -> Plan:
        """A context-aware composition's plan for ``text``: α over the composition's own skills (the
        library's α restricted to them and renormalised), turned into weights by the shared rule."""
        names = [parse_ref(ref)[0] for ref in comp.skills]
        if not text or not text.strip():
            return contextual_plan(comp, [1.0 / len(names)] * len(names), None, self.config.rule,
                                   "the prompt is empty: every skill at full strength")
        if not skills:
            return contextual_plan(comp, [1.0 / len(names)] * len(names), None, self.config.rule,
                                   "the router has no skills: every skill at full strength")
        model = self.model_for(skills)
        e = self.encoder.encode([text])[0].astype(np.float64)
        alpha = dict(zip(model.names, model.alpha(e).tolist()))
        sims = dict(zip(model.names, model.similarity(e).tolist()))
        return contextual_plan(comp, restrict(alpha, names), [sims.get(n, float("nan")) for n in names], self.config.rule)
