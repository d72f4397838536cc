"""The router's embedding cache in Redis holds the library's profile texts and no others: a deleted skill's
texts, and a changed skill's old ones, are deleted when the router takes up the change (a text another skill
still has stays), and a new process deletes what skills deleted while no router ran left behind. Real Redis."""

from __future__ import annotations

import dataclasses

import numpy as np

from router.embeddings import EMB_KEY, text_key
from router.psec import PsecRouter
from tests.helpers import ROUTER_CONFIG, ROUTER_SHAPES, random_adapter


class CountingEncoder:
    """A text's vector from its hash (no model to load); counts the texts it encodes."""

    name = "counting-stub"

    def __init__(self) -> None:
        self.encoded = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.encoded += len(texts)
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(384) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


def _router(registry) -> PsecRouter:
    return PsecRouter(dataclasses.replace(ROUTER_CONFIG, lr_max_skills=0), registry, encoder=CountingEncoder())


def _add(registry, name: str, examples: list[str], description: str = "", seed: int = 0) -> None:
    registry.add(name, random_adapter(ROUTER_SHAPES, r=1, seed=seed), description=description, examples=examples)


def _cached(registry) -> set[str]:
    return set(registry.aux.field_names(EMB_KEY))


def _fields(texts: list[str]) -> set[str]:
    return {text_key(CountingEncoder.name, t) for t in texts}


def test_a_deleted_skills_embeddings_go_with_it(registry):
    keep = ["translate this into French", "how do you say cat in French"]
    doomed = [f"doomed example number {i}" for i in range(50)] + ["translate this into French"]  # one text shared
    _add(registry, "french", keep, "Translates into French.")
    _add(registry, "doomed", doomed, "A skill about to go.", seed=1)
    router = _router(registry)
    router.index(registry.list())
    assert _cached(registry) == _fields(keep + ["Translates into French."] + doomed + ["A skill about to go."])

    registry.delete("doomed")
    router.index(registry.list())
    assert _cached(registry) == _fields(keep + ["Translates into French."])  # the shared text stays


def test_changed_examples_replace_their_embeddings(registry):
    _add(registry, "s", ["old one", "old two"], "Same description.")
    router = _router(registry)
    router.index(registry.list())
    _add(registry, "s", ["new one", "old two"], "Same description.", seed=1)  # version 2 is the one routed
    router.index(registry.list())
    assert _cached(registry) == _fields(["new one", "old two", "Same description."])
    assert router.encoder.encoded == 4  # unchanged texts are not encoded again


def test_a_new_process_deletes_what_deleted_skills_left(registry):
    """Skills deleted while no router ran (the CLI, another replica that stopped): the first index a process
    builds compares the whole cache with the library."""
    _add(registry, "kept", ["kept example"])
    _add(registry, "gone", [f"gone example {i}" for i in range(20)], seed=1)
    _router(registry).index(registry.list())
    registry.delete("gone")
    fresh = _router(registry)
    fresh.index(registry.list())
    assert _cached(registry) == _fields(["kept example"])
    assert fresh.encoder.encoded == 0  # what the library still has was read from the cache
