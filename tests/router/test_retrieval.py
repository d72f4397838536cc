"""Retrieve-then-compose: the router retrieves the skills nearest the prompt and computes α among only
those; before any model exists it routes by nearest example without waiting for a fit; a deleted skill is
never chosen. The mechanics use a small deterministic encoder (a keyword's direction plus a little of the
text's own); the cold-start routing uses the real MiniLM encoder on the demo skills."""

import dataclasses
import hashlib
import io
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bench.demo_data import examples
from router.psec import MODEL_KEY, PsecRouter
from router.retrieval import EXACT_ROWS, ProfileDigests, ProfileIndex, profile_digest
from tests.helpers import ROUTER_CONFIG, ROUTER_SHAPES, add_demo_profiles, random_adapter


def _direction(s: str) -> np.ndarray:
    return np.random.default_rng(int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)).standard_normal(384)


class KeywordEncoder:
    """Every text leads with its skill's keyword: its vector is the keyword's direction plus 0.3 of the text's."""

    name = "keyword-stub"

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.encoded += texts
        rows = [_direction(t.split()[0]) + 0.3 * _direction(t) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32) if rows else np.zeros((0, 384), np.float32)


def _profile(i: int) -> SimpleNamespace:
    w = f"kw{i}"
    return SimpleNamespace(name=f"skill-{i:05d}", sha256=f"{i:064x}", description=f"{w} rewrites text",
                           examples=[f"{w} this sentence please", f"{w} the following: good morning"])


def _brute_force(index: ProfileIndex, e: np.ndarray, k: int) -> list[str]:
    sims = index.X @ e.astype(np.float32)
    best = np.maximum.reduceat(sims, index.starts[:-1])
    return [index.names[i] for i in np.argsort(-best)[:k]]


@pytest.mark.parametrize("n", [50, 3000])  # every row scored; centroids first (3000 × 3 rows > EXACT_ROWS)
def test_retrieval_returns_the_nearest_skills(n):
    enc = KeywordEncoder()
    index = ProfileIndex.build([_profile(i) for i in range(n)], enc.encode)
    assert (len(index.X) > EXACT_ROWS) == (n == 3000)
    for i in range(0, n, max(1, n // 20)):
        e = enc.encode([f"kw{i} could you do this one: see you tomorrow"])[0]
        idx, sims = index.nearest(e, 8, coarse=64)
        assert index.names[idx[0]] == f"skill-{i:05d}"
        assert [index.names[j] for j in idx] == _brute_force(index, e, 8)
        assert np.all(np.diff(sims) <= 0) and sims[0] == pytest.approx(float((index.X @ e)[index.starts[idx[0]]:index.starts[idx[0] + 1]].max()), abs=1e-5)


@pytest.mark.parametrize("n", [50, 3000])
def test_retrieval_leaves_out_the_masked_skills_before_taking_the_nearest(n):
    enc = KeywordEncoder()
    index = ProfileIndex.build([_profile(i) for i in range(n)], enc.encode)
    allowed = np.random.default_rng(0).random(n) < 0.5
    for i in range(0, n, max(1, n // 20)):
        e = enc.encode([f"kw{i} could you do this one: see you tomorrow"])[0]
        idx, _ = index.nearest(e, 8, coarse=64, allowed=allowed)
        assert len(idx) == 8 and allowed[idx].all()
        assert [index.names[j] for j in idx] == [name for name in _brute_force(index, e, n) if allowed[index.position[name]]][:8]
        assert (index.names[idx[0]] == f"skill-{i:05d}") == bool(allowed[i])
    assert len(index.nearest(e, 8, coarse=64, allowed=np.zeros(n, bool))[0]) == 0


def test_a_rebuilt_index_reuses_unchanged_rows_and_encodes_only_new_texts():
    enc = KeywordEncoder()
    skills = [_profile(i) for i in range(40)]
    first = ProfileIndex.build(skills, enc.encode)
    enc.encoded.clear()
    edited = SimpleNamespace(**{**vars(skills[3]), "examples": ["kw3 something new"]})
    second = ProfileIndex.build([*skills[:3], edited, *skills[4:], _profile(40)], enc.encode, previous=first)
    assert sorted(enc.encoded) == sorted(["kw3 something new", "kw3 rewrites text", *_profile(40).examples, "kw40 rewrites text"])
    assert len(second.names) == 41
    for name in (skills[0].name, skills[39].name):
        a, b = first.position[name], second.position[name]
        np.testing.assert_array_equal(first.X[first.starts[a]:first.starts[a + 1]], second.X[second.starts[b]:second.starts[b + 1]])
    library = [*skills[:3], edited, *skills[4:], _profile(40)]
    digests = ProfileDigests()
    third = ProfileIndex.build(library[5:], enc.encode, previous=second, digest=digests)  # five deleted
    for index, skills_now in ((second, library), (third, library[5:])):  # the same as built from nothing
        cold = ProfileIndex.build(skills_now, KeywordEncoder().encode)
        assert index.names == cold.names and index.digests == cold.digests
        np.testing.assert_array_equal(index.starts, cold.starts)
        np.testing.assert_allclose(index.X, cold.X, atol=1e-6)
        np.testing.assert_allclose(index.centroids, cold.centroids, atol=1e-6)
    assert digests(library[5:]) == third.digests == [profile_digest(s) for s in library[5:]]


def _stub_router(registry, n: int, **config) -> PsecRouter:
    for i in range(n):
        p = _profile(i)
        registry.add(p.name, random_adapter(ROUTER_SHAPES, r=1, seed=i), description=p.description, examples=p.examples)
    return PsecRouter(dataclasses.replace(ROUTER_CONFIG, ood=0.3, **config), registry, encoder=KeywordEncoder())


@pytest.mark.parametrize("lr_max_skills", [0, 100])  # α from a similarity softmax; from the network
def test_alpha_is_computed_among_the_candidates_only(registry, lr_max_skills):
    router = _stub_router(registry, 24, top_k=4, lr_max_skills=lr_max_skills)
    skills = registry.list()
    model = router.trained(skills, timeout=120)
    assert (model.coef is None) == (lr_max_skills == 0)
    for i in (0, 7, 23):
        prompt = f"kw{i} could you do this one: see you tomorrow"
        plan = router.route(prompt, skills, registry.generation())
        e = router.encoder.encode([prompt])[0]
        assert set(plan.scores) == set(_brute_force(model.index, e, 4)) == set(plan.similarity)
        assert sum(plan.scores.values()) == pytest.approx(1, abs=1e-3)
        assert plan.kind == "skill" and plan.skill == f"skill-{i:05d}", plan


class GatedTraining:
    """Each call of the router's ``train`` waits until the test opens the gate."""

    def __init__(self, router: PsecRouter) -> None:
        self.gate, self.started = threading.Event(), threading.Event()
        self._train = router.train
        router.train = self

    def __call__(self, skills, *args):
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self._train(skills, *args)


class CountedTraining:
    """Counts the calls of the router's ``train`` (a model loaded from Redis is not trained)."""

    def __init__(self, router: PsecRouter) -> None:
        self.calls = 0
        self._train = router.train
        router.train = self

    def __call__(self, skills, *args):
        self.calls += 1
        return self._train(skills, *args)


def test_a_deleted_skill_is_never_chosen_while_the_index_is_rebuilt(registry):
    router = _stub_router(registry, 24, top_k=4, lr_max_skills=0, train_wait_seconds=0.0)
    prompt = "kw5 could you do this one: see you tomorrow"
    router.trained(registry.list(), timeout=120)
    assert router.route(prompt, registry.list(), registry.generation()).skill == "skill-00005"
    gated = GatedTraining(router)
    registry.delete("skill-00005")
    plan = router.route(prompt, registry.list(), registry.generation())
    assert gated.started.wait(30)  # the rebuild is held: the previous index answers
    assert "skill-00005" not in plan.skills and "skill-00005" not in plan.scores, plan
    assert len(plan.scores) == 4  # the deleted skill's place goes to the next nearest of the previous index
    gated.gate.set()
    assert router.trained(registry.list(), timeout=60).key != ""
    plan = router.route(prompt, registry.list(), registry.generation())
    assert "skill-00005" not in plan.scores and len(plan.scores) == 4


def test_cold_start_routes_by_nearest_example_without_waiting_for_the_fit(registry, encoder):
    add_demo_profiles(registry)
    router = PsecRouter(dataclasses.replace(ROUTER_CONFIG, train_wait_seconds=0.2), registry, encoder=encoder)
    PsecRouter(ROUTER_CONFIG, registry, encoder=encoder).index(registry.list())  # the profiles' embeddings cached
    gated = GatedTraining(router)  # the network's fit never ends until the gate opens
    prompt = examples("reverse_list", "test", 1, seed=3)[0][0]
    t0 = time.monotonic()
    plan = router.route(prompt, registry.list(), registry.generation())
    waited = time.monotonic() - t0
    assert waited < 10, waited  # the index from the embedding cache and the prompt's encoding, never the fit
    assert gated.started.wait(30) and not gated.gate.is_set()
    assert plan.kind == "skill" and plan.skill == "reverse_list", plan
    assert not router.model_for(registry.list()).complete  # answered by the index alone
    gated.gate.set()
    assert router.trained(registry.list(), timeout=60).coef is not None


def test_a_deleted_top_skill_leaves_its_place_to_the_next_nearest(registry):
    """top_k=1: the deleted skill is masked before the top_k are taken, so the previous model still has a
    candidate (not the base model for want of one)."""
    router = _stub_router(registry, 6, top_k=1, lr_max_skills=0, train_wait_seconds=0.0)
    registry.add("kw2-twin", random_adapter(ROUTER_SHAPES, r=1, seed=99), description="kw2 also rewrites text",
                 examples=["kw2 this other sentence", "kw2 one more: good night"])
    prompt = "kw2 could you do this one: see you tomorrow"
    router.trained(registry.list(), timeout=120)
    top = router.route(prompt, registry.list(), registry.generation()).skill
    assert top in ("skill-00002", "kw2-twin")
    gated = GatedTraining(router)
    registry.delete(top)
    plan = router.route(prompt, registry.list(), registry.generation())
    assert gated.started.wait(30)  # the previous model answers
    other = ({"skill-00002", "kw2-twin"} - {top}).pop()
    assert plan.kind == "skill" and plan.skill == other and list(plan.scores) == [other], plan
    gated.gate.set()
    assert router.trained(registry.list(), timeout=60).names == sorted(s.name for s in registry.list())


def test_a_cold_start_builds_the_index_once(registry):
    router = _stub_router(registry, 12, lr_max_skills=100)
    builds = []
    index = router.index
    router.index = lambda skills: builds.append(len(skills)) or index(skills)
    assert router.trained(registry.list(), timeout=120).coef is not None
    assert builds == [12]  # the cold model, the look in Redis and the fit share it


def test_changing_lr_max_skills_retrains_instead_of_loading_the_other_mode(registry):
    """The stored model's key holds the α mode: a restart with another lr_max_skills trains its own."""
    network = _stub_router(registry, 12, lr_max_skills=100)
    assert network.trained(registry.list(), timeout=120).coef is not None
    softmax = _stub_router(registry, 0, lr_max_skills=0)
    counted = CountedTraining(softmax)
    model = softmax.trained(registry.list(), timeout=120)
    assert model.coef is None and counted.calls == 1 and model.key != network.model_for(registry.list()).key
    again = _stub_router(registry, 0, lr_max_skills=100)  # back to the network: the softmax model is not it
    counted = CountedTraining(again)
    assert again.trained(registry.list(), timeout=120).coef is not None and counted.calls == 1
    same = _stub_router(registry, 0, lr_max_skills=100)  # the same settings: loaded, not trained
    counted = CountedTraining(same)
    assert same.trained(registry.list(), timeout=120).coef is not None and counted.calls == 0


def _arrays(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_a_stored_model_of_the_old_format_or_the_wrong_shape_is_not_loaded(registry):
    router = _stub_router(registry, 5, lr_max_skills=100)
    skills = registry.list()
    names = sorted(s.name for s in skills)
    old_key = hashlib.sha256(json.dumps([router.encoder.name] + [[s.name, s.sha256, s.description, s.examples]
                                        for s in sorted(skills, key=lambda s: s.name)]).encode()).hexdigest()[:24]
    # the previous code's record: keyed by encoder and profiles only, with the training rows in its arrays
    registry.aux.put(MODEL_KEY, {"key": old_key, "names": json.dumps(names), "trained_seconds": "0",
                                 "arrays": _arrays(X=np.zeros((15, 384)), coef=np.zeros((5, 384)), intercept=np.zeros(5))})
    counted = CountedTraining(router)
    model = router.trained(skills, timeout=120)
    assert counted.calls == 1 and model.key != old_key and np.abs(model.coef).sum() > 0
    # a record under this very key that does not fit (no network, other names, a wrong shape): retrained, no error
    for record in ({"arrays": _arrays()}, {"names": json.dumps(names[:-1])},
                   {"arrays": _arrays(coef=np.zeros((4, 384)), intercept=np.zeros(4))}):
        registry.aux.put(MODEL_KEY, {"key": model.key, "names": json.dumps(names), "trained_seconds": "0",
                                     "arrays": _arrays(coef=np.zeros((5, 384)), intercept=np.zeros(5)), **record})
        fresh = _stub_router(registry, 0, lr_max_skills=100)
        counted = CountedTraining(fresh)
        assert fresh.trained(skills, timeout=120).coef.shape == (5, 384) and counted.calls == 1, record
