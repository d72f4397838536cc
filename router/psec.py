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

Example embeddings are cached in Redis by text, so a text is encoded once for all replicas and restarts,
and deleted once no skill has that text (router/embeddings.py).
The trained network is stored in Redis next to the library, keyed by a hash of every skill's profile and
of what shapes the model (its format version, the encoder, whether α comes from a network, C), so other
replicas load it instead of retraining, and a replica with other settings or older code trains its own. A library change is taken up in a background thread: the
profile index is rebuilt from the previous one (only new texts are encoded) and the network refitted; a
request meanwhile routes with the model it has. Before the first model exists a request waits only for
the index (no fit) and routes by nearest example similarity.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo, parse_ref
from composer.spec import Composition
from router.embeddings import EmbeddingCache
from router.encoder import Encoder, MiniLMEncoder
from router.model import RouterModel, has_network, profile_key
from router.plan import Plan
from router.policy import RouterConfig, nothing_to_route
from router.retrieval import ProfileDigests, ProfileIndex, blas_on_one_thread
from router.weights import contextual_plan, restrict, weights_from_alpha

MODEL_KEY = "router-model"
TRAIN_LOCK = "router-training"  # one replica trains at a time; the others wait for its model
TRAIN_LOCK_SECONDS = 600  # a trainer that died frees the lock after this


class PsecRouter:
    """A :class:`router.policy.RouterPolicy` over an encoder, stored in the registry's Redis."""

    name = "psec"

    def __init__(self, config: RouterConfig, registry: Registry | None = None, *, encoder: Encoder | None = None,
                 C: float = 10.0) -> None:
        self.config = config
        self.registry = registry
        self.encoder = encoder or MiniLMEncoder()
        self._embeddings = EmbeddingCache(registry, self.encoder)
        blas_on_one_thread()  # the encoder's torch threads get the cores
        self.C = C
        self._model: RouterModel | None = None
        self._index: ProfileIndex | None = None  # the last index built: the next one reuses its rows
        self._digests = ProfileDigests()  # each profile hashed once per SkillInfo object
        self._seen: tuple[Sequence[SkillInfo], frozenset[str]] | None = None  # a library list and its names
        self._changed = threading.Condition()  # guards the five below; notified when a model (or an error) arrives
        self._served: Sequence[SkillInfo] | None = None  # the library list the complete model answers for
        self._wanted: Sequence[SkillInfo] | None = None
        self._trainer: threading.Thread | None = None  # None once it has returned (it clears it under the lock)
        self._error: BaseException | None = None
        self._live: tuple[RouterModel, Sequence[SkillInfo], np.ndarray | None] | None = None  # see _live_mask

    # ---- training -----------------------------------------------------------------
    def index(self, skills: Sequence[SkillInfo]) -> ProfileIndex:
        """The profile index of ``skills``, reusing the last one's rows (only changed profiles are embedded);
        the cached embeddings of texts no skill has any more are deleted."""
        self._index = ProfileIndex.build(skills, self._embeddings.embed, previous=self._index, digest=self._digests)
        self._embeddings.keep(self._index.names, self._index.digests, skills)
        return self._index

    def key(self, skills: Sequence[SkillInfo]) -> str:
        """:func:`profile_key` of ``skills`` under this router's settings."""
        digests = self._digests(sorted(skills, key=lambda s: s.name))
        return profile_key(digests, self.encoder.name, self._network(len(skills)), self.C)

    def _network(self, n: int) -> bool:
        return has_network(n, self.config.lr_max_skills)

    def train(self, skills: Sequence[SkillInfo], index: ProfileIndex | None = None) -> RouterModel:
        """The model of ``skills``, stored in Redis: the index (``index`` when it is already built), and the
        network when the library is small."""
        t0 = time.perf_counter()
        index = index if index is not None else self.index(skills)
        model = RouterModel(key=self.key(skills), index=index)
        if self._network(len(index.names)):
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
            if self._trainer is None:  # not is_alive(): a trainer past its last look at _wanted is still alive
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
                    self._trainer = None  # under the lock: the next change starts a new trainer
                    return
                model = self._model
            try:
                key = self.key(skills)  # O(library): here, not in a request
                if model is not None and model.complete and model.key == key:  # the same library in another list
                    with self._changed:
                        self._served = skills
                        self._changed.notify_all()
                    continue
                index = self.index(skills)  # built once: the cold model, the stored one and the fit share it
                if model is None:  # before the first model: the index alone answers while the network is fitted
                    with self._changed:
                        if self._model is None:
                            self._model = RouterModel(key=key, index=index, complete=False)
                            self._changed.notify_all()
                model = self._obtain(key, skills, index)
            except BaseException as e:  # the waiters raise it (the thread reports it too)
                with self._changed:
                    self._error = e
                    self._trainer = None
                    self._changed.notify_all()
                raise
            with self._changed:
                self._model, self._served = model, skills
                self._changed.notify_all()

    def _obtain(self, key: str, skills: Sequence[SkillInfo], index: ProfileIndex) -> RouterModel:
        """The model with ``key`` over ``index``: from Redis if a replica stored it, else trained here under the
        training lock (a replica that finds the lock taken waits for the holder's model)."""
        if self.registry is None:
            return self.train(skills, index)
        lock = self.registry.aux.lock(TRAIN_LOCK, seconds=TRAIN_LOCK_SECONDS)
        while True:
            if (stored := self._stored(key, index)) is not None:
                return stored
            if lock.acquire(wait=1.0):
                break
        try:
            return self._stored(key, index) or self.train(skills, index)
        finally:
            lock.release()  # (expired meanwhile, or lost with Redis: the model stands)

    def _stored(self, key: str, index: ProfileIndex) -> RouterModel | None:
        """The model stored in Redis when it is this library's under these settings, else None."""
        if self.registry.aux.get(MODEL_KEY, ["key"]).get("key", b"").decode() != key:
            return None
        stored = self.registry.aux.get(MODEL_KEY)
        if stored.get("key", b"").decode() != key:
            return None
        return RouterModel.from_redis(stored, index, self._network(len(index.names)))

    # ---- deciding -----------------------------------------------------------------
    def _live_mask(self, model: RouterModel, skills: Sequence[SkillInfo]) -> np.ndarray | None:
        """Which of the model's skills the library still has (None: all of them), once per model and list."""
        live = self._live
        if live is None or live[0] is not model or live[1] is not skills:
            with self._changed:
                served = model is self._model and self._current(skills)
            if served:  # the model of this very list: nothing deleted
                mask = None
            else:
                have = self._names(skills)
                mask = np.fromiter((n in have for n in model.names), dtype=bool, count=len(model.names))
                mask = None if mask.all() else mask
            live = self._live = (model, skills, mask)
        return live[2]

    def candidates(self, model: RouterModel, e: np.ndarray, skills: Sequence[SkillInfo]) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` skills nearest the prompt among those the library still has (indices into the
        model's names, most similar first) and their similarities: a skill deleted since the model was built
        is left out before the ``top_k`` are chosen, so it does not take a candidate's place."""
        k = self.config.top_k
        return model.index.nearest(e, k, coarse=max(64, 4 * k), allowed=self._live_mask(model, skills))

    def route(self, text: str, skills: Sequence[SkillInfo], generation: int) -> Plan:
        if not skills:  # no index to build: the last skill's embeddings go here
            self._embeddings.keep([], [], skills)
        if plan := nothing_to_route(text, skills):
            return plan
        c = self.config
        model = self.model_for(skills)
        e = self.encoder.encode([text])[0].astype(np.float64)
        cand, sims = self.candidates(model, e, skills)
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
