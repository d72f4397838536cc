"""The router's tests share the real MiniLM encoder and a registry holding the demo skills' real profiles."""

import json
from pathlib import Path

import pytest

from router.psec import PsecRouter
from tests.helpers import ROUTER_CONFIG, random_adapter

DEMO = Path(__file__).resolve().parents[2] / "bench" / "skills"
SHAPES = {"model.layers.0.self_attn.q_proj": (576, 576)}


def add_demo(registry):
    """The 8 demo skills' real descriptions and examples, on small random adapters."""
    for d in sorted(DEMO.iterdir()):
        meta = json.loads((d / "mosaic.json").read_text())
        registry.add(d.name, random_adapter(SHAPES, r=2, seed=len(d.name)), description=meta["description"],
                     examples=meta["examples"])


@pytest.fixture(scope="session")
def encoder():
    from router.encoder import MiniLMEncoder

    return MiniLMEncoder()


@pytest.fixture
def router(registry, encoder):
    add_demo(registry)
    return PsecRouter(ROUTER_CONFIG, registry, encoder=encoder)
