"""Every registered router policy keeps the same contract: one constructor, one signature per method,
a base plan with its reason when there is nothing to decide, plans that name only library skills, and
context-aware weights over exactly the composition's own skills."""

import inspect
import json
import typing

import pytest

from bench.demo_data import examples
from composer.spec import Composition
from router.policies import POLICIES, make_policy
from router.policy import RouterPolicy
from server.core.settings import Settings
from tests.helpers import ROUTER_CONFIG, ROUTER_SHAPES, TEST_REDIS_URL, add_demo_profiles, random_adapter, run_cli

NAMES = sorted(POLICIES)


@pytest.fixture(params=NAMES)
def policy(request, registry, encoder):
    policy = make_policy(request.param, ROUTER_CONFIG, registry)
    if hasattr(policy, "encoder"):
        policy.encoder = encoder  # the session's loaded MiniLM, rather than loading another
    return policy


def test_the_settings_offer_exactly_the_registered_policies():
    assert set(typing.get_args(Settings.model_fields["router"].annotation)) == set(POLICIES)
    with pytest.raises(ValueError, match="unknown router policy 'nearest'"):
        make_policy("nearest", ROUTER_CONFIG)


@pytest.mark.parametrize("name", NAMES)
def test_each_policy_has_the_protocols_signatures(name):
    cls = POLICIES[name]
    assert cls.name == name
    for method in ("route", "route_within"):
        ours = list(inspect.signature(getattr(cls, method)).parameters)
        theirs = list(inspect.signature(getattr(RouterPolicy, method)).parameters)
        assert ours == theirs, (name, method)
    assert list(inspect.signature(cls).parameters)[:2] == ["config", "registry"]


def test_nothing_to_decide_means_base_with_the_reason(policy, registry):
    assert policy.route("Reverse the list: a, b", [], 0).reason == "no skills are registered"
    add_demo_profiles(registry)
    plan = policy.route("  \n", registry.list(), registry.generation())
    assert plan.kind == "base" and "empty" in plan.reason


def test_a_clear_prompt_gets_its_skill_and_scores_cover_the_library(policy, registry):
    add_demo_profiles(registry)
    skills = registry.list()
    prompt = examples("reverse_list", "test", 1, seed=3)[0][0]
    plan = policy.route(prompt, skills, registry.generation())
    assert plan.kind == "skill" and plan.skill == "reverse_list", (plan.reason, plan.scores)
    assert set(plan.scores) == {s.name for s in skills}


def test_a_new_skill_is_routed_after_the_library_changes(policy, registry):
    add_demo_profiles(registry)
    prompt = "Write this in pig latin: good morning, my friend"
    before = policy.route(prompt, registry.list(), registry.generation())
    assert before.skill != "piglatin"
    registry.add("piglatin", random_adapter(ROUTER_SHAPES, r=2, seed=9), description="Rewrites English sentences in pig latin.",
                 examples=["Write in pig latin: the cat sleeps", "Pig latin please: I like apples",
                           "How do you say 'thank you very much' in pig latin?"])
    plan = policy.route(prompt, registry.list(), registry.generation())
    assert plan.kind == "skill" and plan.skill == "piglatin", (plan.reason, plan.scores)


def test_context_weights_cover_exactly_the_compositions_skills(policy, registry):
    add_demo_profiles(registry)
    template = Composition(skills=("sentiment", "reverse_list", "json_extract"), weights="auto")
    prompt = examples("sentiment", "test", 1, seed=5)[0][0]
    plan = policy.route_within(prompt, template, registry.list(), registry.generation())
    assert plan.kind == "composition" and plan.composition.skills == template.skills
    assert len(plan.alpha) == 3 and sum(plan.alpha) == pytest.approx(1, abs=1e-3)
    weights = plan.composition.weights
    assert max(weights) == 1.0 and weights[0] == 1.0, (plan.reason, plan.alpha)  # the prompt's own skill leads
    empty = policy.route_within("", template, registry.list(), registry.generation())
    assert empty.composition.weights == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_mosaic_route_uses_the_policy_the_settings_name(name, registry):
    add_demo_profiles(registry)
    env = dict(MOSAIC_REDIS_URL=TEST_REDIS_URL, MOSAIC_REDIS_PREFIX=registry.prefix, MOSAIC_ROUTER=name)
    done = run_cli(env, "route", examples("sentiment", "test", 1, seed=2)[0][0], "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["kind"] == "skill" and plan["skill"] == "sentiment", plan


def test_mosaic_router_train_on_an_empty_library_and_under_lexical(registry):
    env = dict(MOSAIC_REDIS_URL=TEST_REDIS_URL, MOSAIC_REDIS_PREFIX=registry.prefix)
    done = run_cli(env, "router", "train")
    assert done.returncode == 0 and "trained on 0 skills" in done.stdout, done.stderr
    done = run_cli({**env, "MOSAIC_ROUTER": "lexical"}, "router", "train")
    assert done.returncode == 1 and "has no model to train" in done.stderr
