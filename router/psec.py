"""The context-aware router: MiniLM embeddings, retrieve-then-compose, and a PSEC-style compositional network.

PSEC composes skills in parameter space with weights α(x) from a small network over the input. Here the
input is the prompt's embedding. The router first retrieves the ``top_k`` skills nearest the prompt
(router/retrieval.py: cosine to each skill's nearest profile text, LoraRetriever's retrieve-then-compose),
then computes α among only those candidates: from a multinomial logistic regression (scikit-learn) trained
on every skill's example prompts and description while the library has at most ``lr_max_skills`` skills
(cheap and calibrated there), else from a softmax of the candidates' similarities at ``temperature``
(nothing to fit, so nothing grows with the library). The decision rule turns (α, similarities) into a
plan (the names are :class:`router.policy.RouterConfig`'s):

* no skills, or an empty prompt                          -> base model (with the reason)
* the prompt is far from every skill (max similarity < ``ood``) -> base model
* the top skill by α, joined by every other candidate the prompt is
  also close to (similarity ≥ ``mix_similarity``, α ≥ ``mix_min``) -> one skill, or a `psec`
  composition of up to ``rule.max_skills`` weighted by :func:`router.weights.weights_from_alpha`
  (the strongest at full strength, the others α_i / α_max on a grid)

A context-aware composition (``"weights": "auto"``) asks :meth:`PsecRouter.route_within`: the same
α, restricted to the composition's own skills, through the same weight rule.

The thresholds (:class:`router.policy.RouterConfig`) come from the server's settings; bench/route.py
measures where they sit between held-out, two-skill and out-of-distribution prompts, bench/scale.py what
the router costs up to 10,000 skills (bench/reports/REPORT.md).

Example embeddings are cached in Redis by text, so a text is encoded once for all replicas and restarts.
The trained network is stored in Redis next to the library, keyed by a hash of every skill's profile, so
other replicas load it instead of retraining. A library change is taken up in a background thread: the
profile index is rebuilt from the previous one (only new texts are encoded) and the network refitted; a
request meanwhile routes with the model it has. Before the first model exists a request waits only for
the index (no fit) and routes by nearest example similarity.
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
from router.retrieval import DIM, ProfileIndex, softmax
from router.weights import contextual_plan, restrict, weights_from_alpha

MODEL_KEY = "router-model"
EMB_KEY = "router-embeddings"
TRAIN_LOCK = "router-training"  # one replica trains at a time; the others wait for its model
TRAIN_LOCK_SECONDS = 600  # a trainer that died frees the lock after this


def profile_key(skills: Sequence[SkillInfo], encoder: str) -> str:
    doc = [encoder] + [[s.name, s.sha256, s.description, s.examples] for s in sorted(skills, key=lambda s: s.name)]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


@dataclass
class RouterModel:
    """The router for one library: its profile index, and the network's weights when the library is small
    enough to have one (``coef`` None: α is the softmax of the candidates' similarities). ``complete`` is
    False for the index alone that serves before the first network is trained."""

    key: str
    index: ProfileIndex
    coef: np.ndarray | None = None  # (classes × d), classes in index.names order
    intercept: np.ndarray | None = None
    trained_seconds: float = 0.0
    complete: bool = True

    @property
    def names(self) -> list[str]:
        return self.index.names

    @property
    def y(self) -> np.ndarray:
        return self.index.y

    def alpha(self, e: np.ndarray, among: np.ndarray, sims: np.ndarray, temperature: float) -> np.ndarray:
        """α over the skills ``among`` (indices; ``sims`` their similarities), summing to 1."""
        if len(among) == 0:
            return np.zeros(0)
        if self.coef is None:
            return softmax(sims, temperature)
        logits = self.coef @ e + self.intercept
        if self.coef.shape[0] == 1:  # binary LR: one logit
            p1 = 1 / (1 + np.exp(-float(logits[0])))
            full = np.array([1 - p1, p1])
        else:
            full = np.exp(logits - logits.max())
        sub = full[among]
        return sub / sub.sum() if sub.sum() > 0 else np.full(len(among), 1.0 / len(among))

    def to_redis(self) -> dict[str, bytes | str]:
        buf = io.BytesIO()
        np.savez(buf, **({"coef": self.coef, "intercept": self.intercept} if self.coef is not None else {}))
        return {"key": self.key, "names": json.dumps(self.names), "arrays": buf.getvalue(),
                "trained_seconds": str(self.trained_seconds)}

    @classmethod
    def from_redis(cls, raw: dict[str, bytes], index: ProfileIndex) -> "RouterModel":
        """The stored network over this replica's own index of the same library (the key says it is)."""
        z = np.load(io.BytesIO(raw["arrays"]))
        assert json.loads(raw["names"]) == index.names, "the stored router model is for another library"
        return cls(key=raw["key"].decode(), index=index, coef=z["coef"] if "coef" in z else None,
                   intercept=z["intercept"] if "intercept" in z else None,
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
        self._index: ProfileIndex | None = None  # the last index built: the next one reuses its rows
        self._seen: tuple[Sequence[SkillInfo], frozenset[str]] | None = None  # a library list and its names
        self._changed = threading.Condition()  # guards the five below; notified when a model (or an error) arrives
        self._served: Sequence[SkillInfo] | None = None  # the library list the complete model answers for
        self._wanted: Sequence[SkillInfo] | None = None
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
        return np.stack([out[k] for k in keys]) if keys else np.zeros((0, DIM), np.float32)

    def index(self, skills: Sequence[SkillInfo]) -> ProfileIndex:
        """The profile index of ``skills``, reusing the last one's rows (only changed profiles are embedded)."""
        self._index = ProfileIndex.build(skills, self._embed, previous=self._index)
        return self._index

    def train(self, skills: Sequence[SkillInfo]) -> RouterModel:
        """The model of ``skills``, stored in Redis: the index, and the network when the library is small."""
        t0 = time.perf_counter()
        index = self.index(skills)
        model = RouterModel(key=profile_key(skills, self.encoder.name), index=index)
        if 2 <= len(index.names) <= self.config.lr_max_skills:
            clf = LogisticRegression(C=self.C, max_iter=2000).fit(index.X, index.y)
            model.coef, model.intercept = clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)
        model.trained_seconds = time.perf_counter() - t0
        if self.registry:
            self.registry.aux.put(MODEL_KEY, model.to_redis())
        return model

    def _names(self, skills: Sequence[SkillInfo]) -> frozenset[str]:
        """The library's names, once per list (the server re-reads it only when it changes)."""
        seen = self._seen
        if seen is None or seen[0] is not skills:
            seen = self._seen = (skills, frozenset(s.name for s in skills))
        return seen[1]

    def model_for(self, skills: Sequence[SkillInfo]) -> RouterModel:
        """The model for ``skills``: this process's, the one in Redis (another replica trained it), or a new
        one. The library's key and model are worked out in one background thread here (the network is
        trained on one replica at a time, under a Redis lock); a request waits for it at most
        ``config.train_wait_seconds`` (None: until it is done), then routes with the model it has
        (:meth:`route` leaves out skills that model knows and the library no longer has). With no model yet,
        a request waits for the profile index only (not the fit; None: for the fit too) and routes by nearest
        example similarity."""
        with self._changed:
            model = self._model
            if self._current(skills):
                return model
            self._wanted = skills
            if self._trainer is None or not self._trainer.is_alive():
                self._error = None
                self._trainer = threading.Thread(target=self._train_wanted, name="router-train", daemon=True)
                self._trainer.start()
            wait = self.config.train_wait_seconds
            if wait is None:
                self._changed.wait_for(lambda: self._current(skills) or self._error is not None)
            elif model is None or not model.complete:  # cold start: the index is enough, the fit is not awaited
                self._changed.wait_for(lambda: self._model is not None or self._error is not None)
            else:
                self._changed.wait_for(lambda: self._current(skills) or self._error is not None, timeout=wait)
            if self._model is None or wait is None and not self._current(skills):
                raise self._error
            return self._model

    def trained(self, skills: Sequence[SkillInfo], timeout: float | None = None) -> RouterModel:
        """The complete model for ``skills`` (index and network), waiting for the background training
        however the wait is configured (the CLI, benchmarks and tests that need the trained network)."""
        self.model_for(skills)
        with self._changed:
            if not self._changed.wait_for(lambda: self._current(skills) or self._error is not None, timeout=timeout):
                raise TimeoutError(f"the router was not trained within {timeout} s")
            if not self._current(skills):
                raise self._error
            return self._model

    def _current(self, skills: Sequence[SkillInfo]) -> bool:
        """Whether the complete model answers for this very list (the caller holds ``_changed``)."""
        return self._model is not None and self._model.complete and self._served is skills

    def _train_wanted(self) -> None:
        """The trainer thread: until this process has the model of the library last asked for."""
        while True:
            with self._changed:
                skills = self._wanted
                if self._current(skills):
                    return
                model = self._model
            try:
                key = profile_key(skills, self.encoder.name)  # O(library): here, not in a request
                if model is None:  # before the first model: the index alone answers while the network is fitted
                    index = self.index(skills)
                    with self._changed:
                        if self._model is None:
                            self._model = RouterModel(key=key, index=index, complete=False)
                            self._changed.notify_all()
                elif model.complete and model.key == key:  # the same library in another list
                    with self._changed:
                        self._served = skills
                        self._changed.notify_all()
                    continue
                model = self._obtain(key, skills)
            except BaseException as e:  # the waiters raise it (the thread reports it too)
                with self._changed:
                    self._error = e
                    self._changed.notify_all()
                raise
            with self._changed:
                self._model, self._served = model, skills
                self._changed.notify_all()

    def _obtain(self, key: str, skills: Sequence[SkillInfo]) -> RouterModel:
        """The model with ``key``: from Redis if a replica stored it, else trained here under the training lock
        (a replica that finds the lock taken waits for the holder's model)."""
        if self.registry is None:
            return self.train(skills)
        lock = self.registry.aux.lock(TRAIN_LOCK, seconds=TRAIN_LOCK_SECONDS)
        while True:
            if (stored := self._stored(key, skills)) is not None:
                return stored
            if lock.acquire(blocking=True, blocking_timeout=1.0):
                break
        try:
            return self._stored(key, skills) or self.train(skills)
        finally:
            with contextlib.suppress(LockNotOwnedError):  # it expired (or Redis lost it): the model stands
                lock.release()

    def _stored(self, key: str, skills: Sequence[SkillInfo]) -> RouterModel | None:
        if self.registry.aux.get(MODEL_KEY, ["key"]).get("key", b"").decode() != key:
            return None
        stored = self.registry.aux.get(MODEL_KEY)
        return RouterModel.from_redis(stored, self.index(skills)) if stored.get("key", b"").decode() == key else None

    # ---- deciding -----------------------------------------------------------------
    def candidates(self, model: RouterModel, e: np.ndarray, have: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` skills nearest the prompt that the library still has (indices into the model's
        names, most similar first) and their similarities."""
        k = self.config.top_k
        idx, sims = model.index.nearest(e, k, coarse=max(64, 4 * k))
        live = np.array([model.names[i] in have for i in idx], dtype=bool)
        return idx[live], sims[live]

    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        if plan := nothing_to_route(text, skills):
            return plan
        c = self.config
        model = self.model_for(skills)
        have = self._names(skills)
        e = self.encoder.encode([text])[0].astype(np.float64)
        cand, sims = self.candidates(model, e, have)
        if len(cand) == 0:
            return Plan(kind="base", reason="the router's model knows none of the library's skills yet")
        alpha = model.alpha(e, cand, sims, c.temperature)
        names = [model.names[i] for i in cand]
        order = np.argsort(-alpha, kind="stable")
        scores = {n: round(float(a), 4) for n, a in zip(names, alpha)}
        similarity = {n: round(float(s), 4) for n, s in zip(names, sims)}
        top = int(order[0])
        if sims.max() < c.ood:
            return Plan(kind="base", reason=f"out of distribution: similarity {sims.max():.2f} to the nearest skill "
                        f"is below {c.ood}", scores=scores, similarity=similarity)
        chosen = [top] + [int(i) for i in order[1:] if sims[i] >= c.mix_similarity and alpha[i] >= c.mix_min]
        chosen = chosen[: c.rule.max_skills]
        w = weights_from_alpha(alpha[chosen], c.rule)
        chosen, w = [i for i, x in zip(chosen, w) if x], [x for x in w if x]
        if len(chosen) >= 2:
            comp = Composition(skills=tuple(names[i] for i in chosen), weights=tuple(w), method="psec")
            return Plan(kind="composition", composition=comp, reason="the prompt asks for several skills: "
                        + ", ".join(f"{names[i]} (α={alpha[i]:.2f}, similarity {sims[i]:.2f}, w={x:g})"
                                    for i, x in zip(chosen, w)),
                        scores=scores, similarity=similarity)
        return Plan(kind="skill", skill=names[top], reason=f"{names[top]} (α={alpha[top]:.2f}, similarity {sims[top]:.2f})",
                    scores=scores, similarity=similarity)

    def route_within(self, text: str, comp: Composition, skills: Sequence[SkillInfo], generation: int) -> Plan:
        """A context-aware composition's plan for ``text``: α over the composition's own skills (the
        router's α restricted to them and renormalised), turned into weights by the shared rule."""
        names = [parse_ref(ref)[0] for ref in comp.skills]
        if not text or not text.strip():
            return contextual_plan(comp, [1.0 / len(names)] * len(names), None, self.config.rule,
                                   "the prompt is empty: every skill at full strength")
        if not skills:
            return contextual_plan(comp, [1.0 / len(names)] * len(names), None, self.config.rule,
                                   "the router has no skills: every skill at full strength")
        model = self.model_for(skills)
        e = self.encoder.encode([text])[0].astype(np.float64)
        known = [n for n in dict.fromkeys(names) if n in model.index.position]
        idx = np.array([model.index.position[n] for n in known], dtype=np.int64)
        sims = model.index.similarity_of(e, idx)
        alpha = dict(zip(known, model.alpha(e, idx, sims, self.config.temperature).tolist()))
        sim = dict(zip(known, sims.tolist()))
        return contextual_plan(comp, restrict(alpha, names), [sim.get(n, float("nan")) for n in names], self.config.rule)
