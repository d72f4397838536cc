"""No request stalls the server: while each hostile body or upload is processed, a concurrent poller asks
``/health`` every few milliseconds, and the event loop is never blocked for more than 100 ms; the hostile
request is answered with its 4xx within a second (a real ``mosaic serve`` process on the reference engine:
these requests never reach an engine)."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.cli.launch import serving
from tests.data.hostile import big_bodies
from tests.helpers import mosaic_env, new_prefix

HOSTILE = Path(__file__).resolve().parents[1] / "data" / "hostile"
MANIFEST = json.loads((HOSTILE / "manifest.json").read_text())
STALL_MS = 100  # the most the event loop may be blocked by one request
ANSWER_S = 1.0


@pytest.fixture(scope="module")
def url(base_model_dir, base_spec, tmp_path_factory, redis_client):
    from tests.helpers import drop_prefix

    data = tmp_path_factory.mktemp("noisy")
    env = mosaic_env(base_model_dir, base_spec.model_id, data, prefix=new_prefix("noisy"), engine="hf")
    try:
        with serving(env, data / "server.log", timeout=300) as (address, _, _):
            yield address
    finally:
        drop_prefix(redis_client, env["MOSAIC_REDIS_PREFIX"])


class Poller(threading.Thread):
    """Asks /health back to back, keeping each answer's latency (ms)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.stopped, self.answered = url, [], threading.Event(), threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopped.is_set():
                t0 = time.perf_counter()
                client.get(f"{self.url}/health")
                self.latencies.append((time.perf_counter() - t0) * 1000)
                self.answered.set()
                time.sleep(0.005)


def _baseline(url: str) -> float:
    with httpx.Client(timeout=30) as client:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            client.get(f"{url}/health")
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _while_polled(url: str, send) -> tuple[httpx.Response, float, float]:
    """``send()``'s response, how long it took (s), and the longest /health latency meanwhile (ms)."""
    poller = Poller(url)
    poller.start()
    # polling before the request goes (on a loaded machine a thread can take longer to start than the request takes)
    assert poller.answered.wait(30), "/health never answered"
    time.sleep(0.05)
    t0 = time.monotonic()
    try:
        r = send()
    finally:
        elapsed = time.monotonic() - t0
        time.sleep(0.05)  # a stall that outlasts the answer still shows
        poller.stopped.set()
        poller.join()
    return r, elapsed, max(poller.latencies)


def _body_cases(base: str) -> list:
    manifest = [(c["what"], c["method"], c["path"],
                 c["body"] if isinstance(c["body"], str) or c["body"] is None else
                 json.dumps({k: base if v == "BASE" else v for k, v in c["body"].items()}), c["status"])
                for c in MANIFEST["bodies"]]
    return manifest + big_bodies.cases(base)


def _problems(url: str, what: str, r: httpx.Response, status: int, elapsed: float, worst: float) -> list[str]:
    """What is wrong with one hostile request's handling (each case is measured; all are reported at once)."""
    print(f"{what}: {r.status_code} in {elapsed * 1000:.0f} ms, /health at most {worst:.0f} ms")
    problems = []
    if r.status_code != status:
        problems.append(f"{what}: {r.status_code} {r.text[:300]}")
    elif status >= 400 and set(r.json()["error"]) != {"message", "type", "param", "code"}:
        problems.append(f"{what}: not OpenAI's error shape: {r.text[:300]}")
    if elapsed >= ANSWER_S:
        problems.append(f"{what}: answered after {elapsed:.2f} s")
    if worst - _baseline(url) >= STALL_MS:
        problems.append(f"{what}: /health waited {worst:.0f} ms (the event loop was blocked)")
    return problems


def test_hostile_bodies_never_stall_the_server(url, base_spec):
    problems = []
    for what, method, path, body, status in _body_cases(base_spec.model_id):
        content = body.encode() if isinstance(body, str) else body
        with httpx.Client(timeout=60) as client:
            r, elapsed, worst = _while_polled(url, lambda: client.request(
                method, f"{url}{path}", content=content, headers={"content-type": "application/json"}))
        problems += _problems(url, what, r, status, elapsed, worst)
    assert not problems, "\n".join(problems)


def test_hostile_uploads_never_stall_the_server(url):
    problems = []
    for case in MANIFEST["uploads"]:
        files = [("files", (name, (HOSTILE / path).read_bytes())) for name, path in case["files"].items()]
        with httpx.Client(timeout=60) as client:
            r, elapsed, worst = _while_polled(url, lambda: client.post(f"{url}/v1/adapters", data={"name": "hostile"},
                                                                         files=files))
            if r.status_code == 201:
                assert client.delete(f"{url}/v1/adapters/hostile").status_code == 200
        problems += _problems(url, case["what"], r, case["status"], elapsed, worst)
    assert not problems, "\n".join(problems)
