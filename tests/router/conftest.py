"""The router's tests share the real MiniLM encoder and a registry holding the demo skills' real profiles."""

import pytest

from router.psec import PsecRouter
from tests.helpers import ROUTER_CONFIG, add_demo_profiles

@pytest.fixture(scope="session")
def encoder():
    from router.encoder import MiniLMEncoder

    return MiniLMEncoder()


@pytest.fixture
def router(registry, encoder):
    add_demo_profiles(registry)
    return PsecRouter(ROUTER_CONFIG, registry, encoder=encoder)
