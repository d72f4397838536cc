"""The auto router with the real MiniLM encoder, the demo skills' real profiles and real Redis."""

import pytest

from bench.demo_data import examples
from bench.route_prompts import MULTI, OOD
from router.psec import MODEL_KEY, PsecRouter
from tests.helpers import ROUTER_CONFIG, random_adapter
from tests.helpers import ROUTER_SHAPES


@pytest.mark.parametrize("skill", ["json_extract", "sentiment", "reverse_list"])
def test_held_out_paraphrases_route_to_their_skill(router, registry, skill):
    # test templates differ from the training templates the examples were drawn from
    prompts = [p for p, _ in examples(skill, "test", 15, seed=11)]
    plans = [router.route(p, registry.list(), registry.generation()) for p in prompts]
    hits = sum(p.kind == "skill" and p.skill == skill for p in plans)
    assert hits >= 14, [(p.kind, p.skill, p.scores) for p in plans]


@pytest.mark.parametrize("prompt", OOD[:8])
def test_unrelated_prompts_go_to_base(router, registry, prompt):
    plan = router.route(prompt, registry.list(), registry.generation())
    assert plan.kind == "base" and "out of distribution" in plan.reason


def test_two_skill_prompts_get_psec_compositions(router, registry):
    # measured with the 8 demo skills: 3 of the 4 prompts compose exactly their two skills (the fourth's
    # second skill has α 0.08, under mix_min); every plan leads with one of the skills asked for
    plans = [(router.route(prompt, registry.list(), registry.generation()), expected) for prompt, expected in MULTI]
    exact = [p for p, expected in plans if p.kind == "composition" and set(p.composition.skills) == expected]
    assert len(exact) >= 3, [(p.kind, p.skills, p.scores) for p, _ in plans]
    for p in exact:  # the strongest skill at full strength, the other α_i/α_max on the 0.25 grid
        alpha = [p.scores[s] for s in p.composition.skills]
        assert p.composition.method == "psec" and max(p.composition.weights) == 1.0
        for a, w in zip(alpha, p.composition.weights):
            assert w == pytest.approx(round(a / max(alpha) * 4) / 4) and w > 0
    assert all(p.skills[0] in expected for p, expected in plans)


@pytest.mark.parametrize("prompt", ["", "   \n\t", "x" * 100_000, "これはレビューです。とても美味しかった！", "🙂" * 50])
def test_edge_prompts_never_fail(router, registry, prompt):
    plan = router.route(prompt, registry.list(), registry.generation())
    assert plan.reason and set(plan.skills) <= {s.name for s in registry.list()}, plan
    if not prompt.strip():
        assert plan.kind == "base" and "empty" in plan.reason


def test_no_skills_means_base_with_the_reason(registry, encoder):
    plan = PsecRouter(ROUTER_CONFIG, registry, encoder=encoder).route("Reverse the list: a, b", registry.list(), registry.generation())
    assert plan.kind == "base" and plan.reason == "no skills are registered"


def test_library_changes_reach_every_replica(router, registry, encoder):
    """Two routers on one Redis: a skill added (or deleted) through one is routed by the other."""
    other = PsecRouter(ROUTER_CONFIG, registry, encoder=encoder)
    prompt = "Write this in pig latin: good morning, my friend"
    assert other.route(prompt, registry.list(), registry.generation()).kind == "base"
    registry.add("piglatin", random_adapter(ROUTER_SHAPES, r=2, seed=9), description="Rewrites English sentences in pig latin.",
                 examples=["Write in pig latin: the cat sleeps", "Pig latin please: I like apples",
                           "How do you say 'thank you very much' in pig latin?"])
    plan = router.route(prompt, registry.list(), registry.generation())
    assert plan.kind == "skill" and plan.skill == "piglatin"
    # the model trained by `router` is stored in Redis: `other` loads it rather than retraining
    assert registry.aux.get(MODEL_KEY)["key"].decode() == router.model_for(registry.list()).key
    assert other.route(prompt, registry.list(), registry.generation()).skill == "piglatin"
    assert other.model_for(registry.list()).trained_seconds == router.model_for(registry.list()).trained_seconds
    registry.delete("piglatin")
    for r in (router, other):
        plan = r.route(prompt, registry.list(), registry.generation())
        assert "piglatin" not in plan.skills and "piglatin" not in plan.scores
