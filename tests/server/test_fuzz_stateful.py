"""Stateful fuzzing: schemathesis follows the OpenAPI links a stored skill publishes (upload -> show ->
download -> compose -> chat -> delete), with every request body generated from the server's own schema,
at least EXAMPLES_PER_OPERATION calls of each operation, against a real server (vLLM engine, Redis;
generation capped at 4 tokens). Zero 5xx, no traceback in the server log, the registry consistent
afterwards and /health answering.

Uploads carry a real PEFT adapter (a demo skill's files) so that about half of them are stored and
their links are followed; the other fields (name, description, examples, tags) are generated, and half
of the names are made valid. Random file contents are fuzzed elsewhere (test_fuzz.py, the hostile
corpus in test_bad_input.py, tests/adapter_store/test_validation_fuzz.py)."""

from __future__ import annotations

import hashlib
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky, FlakyStrategyDefinition
from schemathesis.core.transport import Response

from tests.helpers import DEMO

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 200
OPERATIONS = ["POST /v1/adapters", "GET /v1/adapters", "GET /v1/adapters/{name}", "GET /v1/adapters/{name}/download",
              "DELETE /v1/adapters/{name}", "POST /v1/compositions", "POST /v1/chat/completions"]
SKILLS = ["sentiment", "reverse_list", "json_extract"]


def _upload_files(name: str) -> list[tuple[str, tuple[str, bytes]]]:
    skill = DEMO / SKILLS[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(SKILLS)]
    return [("files", (f.name, f.read_bytes())) for f in (skill / "adapter_config.json", skill / "adapter_model.safetensors")]


def test_a_request_without_max_tokens_is_capped_by_the_setting(fuzz_server):
    """Found by fuzzing: with no max_tokens, vLLM generated up to the whole context (minutes on CPU)."""
    url, _, _ = fuzz_server
    # the base model: the fuzzing that shares this server may have deleted any skill (the schema's
    # examples name the demo skills)
    base = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to one hundred."}]}),
                       ("/v1/completions", {"prompt": "One, two, three,"})):
        r = httpx.post(f"{url}{path}", json={"model": base, "ignore_eos": True, **body}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


def test_linked_operations_never_fail_the_server(fuzz_server):
    url, data, registry = fuzz_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").include(name=OPERATIONS)
    calls: Counter[str] = Counter()
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case):
            return {"base_url": url, "timeout": 120}

        def call(self, case, **kwargs):
            if case.operation.label != "POST /v1/adapters" or not isinstance(case.body, dict):
                return case.call(**kwargs)
            fields = {k: v for k, v in case.body.items() if k != "files" and isinstance(v, str)}
            name = fields.get("name", "")
            digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
            if digest % 2:  # half the names made valid, half of those in a namespace
                fields["name"] = f"fz{'/' if digest % 4 == 1 else '-'}{digest % 10**10}"
            resp = requests.post(f"{url}/v1/adapters", data=fields, files=_upload_files(name), timeout=120)
            return Response.from_requests(resp, verify=True)

        def after_call(self, response, case):
            calls[case.operation.label] += 1
            statuses[(case.operation.label, response.status_code)] += 1
            if isinstance(case.body, dict) and str(case.body.get("model", "")).startswith("fz"):
                calls["chat with a stored skill"] += 1  # the upload's link, followed

        def validate_response(self, response, case, **kwargs):
            if response.status_code >= 500:
                failures.append(f"{case.operation.label} -> {response.status_code}: {response.text[:500]}\n"
                                f"{case.as_curl_command()}")
                raise AssertionError(failures[-1])

    # The links make what is generated depend on the server's answers, which Hypothesis cannot replay
    # exactly: it then reports an inconsistency (Flaky), not a failure. Like schemathesis' own runner,
    # such a run is started again (the calls made so far count); a 5xx is recorded before anything else.
    # Each run draws new examples: derandomize is off even where Hypothesis detects CI (its "ci" profile
    # derandomizes, which made every restart replay the same run up to the same inconsistency).
    Machine.TestCase.settings = settings(
        max_examples=100, stateful_step_count=20, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), derandomize=False,
    )
    for _ in range(40):
        try:
            Machine.TestCase().runTest()
        except (Flaky, FlakyStrategyDefinition):
            pass
        except AssertionError:
            break  # a 5xx: reported below with its request
        if failures or min(calls[op] for op in OPERATIONS) >= EXAMPLES_PER_OPERATION:
            break

    log = (data / "server.log").read_text()
    summary = f"calls {dict(calls)}\nstatuses {dict(sorted(statuses.items()))}"
    print("\n" + summary)
    assert not failures, failures
    assert "Traceback" not in log, log[-3000:]
    assert min(calls[op] for op in OPERATIONS) >= EXAMPLES_PER_OPERATION, summary
    # the links were followed: skills were stored, then served, composed and deleted
    # (most generated chat bodies are refused: e.g. max_tokens over the cap of 4)
    assert statuses[("POST /v1/adapters", 201)] >= 20 and calls["chat with a stored skill"] >= 20, summary
    assert statuses[("DELETE /v1/adapters/{name}", 200)] >= 10, summary
    # the registry is consistent: every listed skill loads, every version resolves, the cache count is exact
    for name in registry.names():
        for info in registry.versions(name):
            assert registry.load(info.ref)[1].rank == info.rank
    cache = registry.compositions
    assert cache.stored_bytes() == sum(
        sum(registry.r.hstrlen(cache._k("c", k), f) for f in ("meta", "config", "weights")) for k in cache.keys())
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
