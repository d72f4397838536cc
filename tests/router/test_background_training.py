"""The router retrains in the background: a request during a retrain is answered by the model it has,
within the configured wait; a new skill is routable once training is done; one replica trains while the
others wait for its model in Redis."""

import dataclasses
import threading
import time

import pytest

from router.psec import PsecRouter
from tests.helpers import ROUTER_CONFIG, ROUTER_SHAPES, add_demo_profiles, random_adapter

PIGLATIN = "Write this in pig latin: good morning, my friend"
WAIT = 0.2


def _add_piglatin(registry):
    registry.add("piglatin", random_adapter(ROUTER_SHAPES, r=2, seed=9), description="Rewrites English sentences in pig latin.",
                 examples=["Write in pig latin: the cat sleeps", "Pig latin please: I like apples",
                           "How do you say 'thank you very much' in pig latin?"])


class GatedTraining:
    """Wraps a router's ``train``: each call waits until the test opens the gate, and is counted."""

    def __init__(self, router: PsecRouter) -> None:
        self.gate, self.started, self.calls = threading.Event(), threading.Event(), 0
        self._train = router.train
        router.train = self

    def __call__(self, skills, *args):
        self.calls += 1
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self._train(skills, *args)


def _routes_to(router, registry, skill: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if router.route(PIGLATIN, registry.list(), registry.generation()).skill == skill:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def bounded(registry, encoder):
    add_demo_profiles(registry)
    router = PsecRouter(dataclasses.replace(ROUTER_CONFIG, train_wait_seconds=WAIT), registry, encoder=encoder)
    router.trained(registry.list())  # the first model (a request before it routes by nearest example)
    return router


def test_a_request_during_a_retrain_is_answered_by_the_model_it_has(bounded, registry):
    before = bounded.route(PIGLATIN, registry.list(), registry.generation())
    gated = GatedTraining(bounded)
    _add_piglatin(registry)
    t0 = time.monotonic()
    during = bounded.route(PIGLATIN, registry.list(), registry.generation())
    waited = time.monotonic() - t0
    assert gated.started.is_set() and waited < WAIT + 1.0, waited  # bounded by the wait (plus encoding the prompt)
    assert during.kind == before.kind and during.skill == before.skill and "piglatin" not in during.scores
    gated.gate.set()
    assert _routes_to(bounded, registry, "piglatin", within=30)  # routable once the training is done
    assert gated.calls == 1  # one training for the change, however many requests asked meanwhile


def test_a_deleted_skill_is_never_chosen_by_the_previous_model(bounded, registry):
    prompt = "Reverse the list: apple, river, tiger"
    assert bounded.route(prompt, registry.list(), registry.generation()).skill == "reverse_list"
    gated = GatedTraining(bounded)
    registry.delete("reverse_list")
    plan = bounded.route(prompt, registry.list(), registry.generation())
    assert gated.started.is_set()
    assert "reverse_list" not in plan.skills and plan.scores.get("reverse_list", 0.0) == 0.0, plan
    gated.gate.set()
    assert "reverse_list" not in bounded.trained(registry.list(), timeout=30).names


def test_one_replica_trains_and_the_other_takes_its_model(registry, encoder):
    add_demo_profiles(registry)
    config = dataclasses.replace(ROUTER_CONFIG, train_wait_seconds=None)
    first, second = (PsecRouter(config, registry, encoder=encoder) for _ in range(2))
    gates = GatedTraining(first), GatedTraining(second)
    answers = {}
    threads = [threading.Thread(target=lambda r=r, i=i: answers.__setitem__(i, r.route(PIGLATIN, registry.list(), 0)))
               for i, r in enumerate((first, second))]
    threads[0].start()
    assert gates[0].started.wait(30)  # the first holds the training lock
    threads[1].start()
    time.sleep(1.5)  # the second would have started training by now if it did not wait for the lock
    assert gates[1].calls == 0
    gates[0].gate.set()
    for t in threads:
        t.join(60)
    assert gates[0].calls == 1 and gates[1].calls == 0
    assert first.model_for(registry.list()).key == second.model_for(registry.list()).key
    assert answers[0].kind == answers[1].kind and answers[0].scores == answers[1].scores


class LingeringRouter(PsecRouter):
    """Its trainer thread stays alive after it has returned, until the test lets it go: the window in which a
    request would see a trainer alive that will never look at the library again."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.returned, self.release = threading.Event(), threading.Event()

    def _train_wanted(self) -> None:
        try:
            super()._train_wanted()
        finally:
            self.returned.set()
            self.release.wait(60)


def test_a_change_as_the_trainer_thread_ends_starts_a_new_trainer(registry, encoder):
    add_demo_profiles(registry)
    router = LingeringRouter(dataclasses.replace(ROUTER_CONFIG, train_wait_seconds=None), registry, encoder=encoder)
    router.trained(registry.list(), timeout=120)
    assert router.returned.wait(30)  # the trainer has returned; its thread is still alive
    _add_piglatin(registry)
    answer = {}
    request = threading.Thread(target=lambda: answer.update(plan=router.route(PIGLATIN, registry.list(), 0)), daemon=True)
    try:
        request.start()
        request.join(60)
        assert not request.is_alive(), "the request waits for a trainer that has already returned"
        assert answer["plan"].skill == "piglatin", answer
    finally:
        router.release.set()


def test_many_alternating_library_changes_each_get_their_model(registry, encoder):
    """Requests alternate between two libraries with the wait unbounded: each gets the model of its own."""
    add_demo_profiles(registry)
    router = PsecRouter(dataclasses.replace(ROUTER_CONFIG, train_wait_seconds=None), registry, encoder=encoder)
    without = registry.list()
    _add_piglatin(registry)
    with_piglatin = registry.list()
    router.trained(with_piglatin, timeout=120)
    router.trained(without, timeout=120)  # both networks stored once: the loop below loads them
    done = threading.Event()
    errors = []

    def alternate() -> None:
        try:
            for i in range(60):
                skills = list(with_piglatin if i % 2 else without)  # a new list each time: a change to take up
                model = router.model_for(skills)
                assert ("piglatin" in model.names) == bool(i % 2), (i, model.names)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=alternate, daemon=True).start()
    assert done.wait(120), "a request waited for a change that was never taken up"
    assert not errors, errors
