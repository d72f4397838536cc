"""What a client can make the server store is bounded by settings, through the real app (TestClient, the
reference engine, real Redis): a skill's example prompts, description and tags (the router embeds each
example and Redis keeps the embeddings: they go when the skill does), and the engine's adapter folders,
held on disk while a request, its stream included, still needs them."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path

import pytest

from router.embeddings import EMB_KEY, text_key
from router.encoder import MiniLMEncoder
from tests.helpers import LOCAL, reference_app

GOOD = Path(__file__).resolve().parents[1] / "data" / "hostile" / "good"


@pytest.fixture(scope="module")
def client(redis_client):
    with reference_app(redis_client) as c:
        yield c


def _upload(client, name: str, **form):
    files = [("files", (f.name, f.read_bytes())) for f in sorted(GOOD.iterdir())]
    data = {"name": name}
    for field, value in form.items():
        data[field] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return client.post("/v1/adapters", data=data, files=files)


def _refused(r, param: str, setting: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and setting in err["message"]


def _names(client) -> list[str]:
    return [s["name"] for s in client.get("/v1/adapters").json()["data"]]


def test_an_upload_with_100000_examples_is_refused(client):
    """The exact upload seen: 100,000 example prompts (within the form field's 1 MB), each embedded by the
    router and kept in Redis."""
    before = _names(client)
    t0 = time.monotonic()
    r = _upload(client, "many-examples", examples=[str(i) for i in range(100_000)])
    assert time.monotonic() - t0 < 1.0
    _refused(r, "examples", "MOSAIC_MAX_EXAMPLES_PER_SKILL")
    assert "100,000 example prompts" in r.json()["error"]["message"] and _names(client) == before


@pytest.mark.parametrize("form, param, setting", [
    ({"examples": ["x" * 2001]}, "examples", "MOSAIC_MAX_EXAMPLE_CHARS"),
    ({"description": "d" * 2001}, "description", "MOSAIC_MAX_DESCRIPTION_CHARS"),
    ({"tags": [f"t{i}" for i in range(33)]}, "tags", "MOSAIC_MAX_TAGS"),
    ({"tags": ["t" * 65]}, "tags", "MOSAIC_MAX_TAG_CHARS"),
], ids=["example-chars", "description", "tags", "tag-chars"])
def test_an_upload_over_a_text_limit_is_refused(client, form, param, setting):
    before = _names(client)
    _refused(_upload(client, "too-much-text", **form), param, setting)
    assert _names(client) == before


def test_an_upload_at_the_limits_is_stored(client):
    r = _upload(client, "at-the-limits", examples=["e" * 2000] * 64, description="d" * 2000, tags=["t" * 64] * 32)
    assert r.status_code == 201, r.text
    assert client.delete("/v1/adapters/at-the-limits").status_code == 200


@pytest.mark.parametrize("examples, status", [(["x"] * 65, 400), (["x"] * 780_000, 413)], ids=["65", "780000"])
def test_a_composition_with_too_many_examples_is_refused(client, examples, status):
    """The exact request seen carried 780,000 examples (under the 8 MiB body limit): it no longer gets to
    the examples check (MOSAIC_MAX_JSON_VALUES refuses it while it arrives); 65 get a 400 from it."""
    before = _names(client)
    body = {"name": "hostile-examples", "skills": ["a", "b"], "examples": examples, "quality_prompts": 0}
    t0 = time.monotonic()
    r = client.post("/v1/compositions", json=body)
    assert time.monotonic() - t0 < 1.0 and r.status_code == status, r.text
    if status == 400:
        _refused(r, "examples", "MOSAIC_MAX_EXAMPLES_PER_SKILL")
    assert _names(client) == before


def _fields(client) -> set[str]:
    registry = client.app.state.mosaic.registry
    return registry.aux.field_names(EMB_KEY)


def _route(client, prompt: str) -> None:
    assert client.post("/v1/route", json={"prompt": prompt}).status_code == 200


def _eventually(check, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_deleted_skills_embeddings_leave_redis(client):
    """Each example prompt's embedding is a field of the router's cache in Redis: after DELETE (and the
    router taking up the change), none of the deleted skill's is left."""
    examples = [f"Spell the word {w} backwards, letter by letter" for w in ("apple", "river", "tiger", "cloud")]
    description = "Spells words backwards."
    assert _upload(client, "backwards", examples=examples, description=description).status_code == 201
    mine = {text_key(MiniLMEncoder.name, t) for t in examples + [description]}
    _route(client, "Spell the word house backwards")
    assert _eventually(lambda: mine <= _fields(client))
    assert client.delete("/v1/adapters/backwards").status_code == 200
    _route(client, "Spell the word house backwards")  # the router takes up the change
    assert _eventually(lambda: not mine & _fields(client)), mine & _fields(client)


def _ready(client) -> None:
    deadline = time.monotonic() + 300
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").text
        time.sleep(0.5)


def test_a_stream_holds_its_folder_until_its_last_event(client):
    """The engine reads an adapter's folder when it schedules the request, for a stream after the handler has
    returned: the folder is held (never removed for room) until the stream's last event has been sent, and
    let go of after it."""
    _ready(client)
    assert _upload(client, "streamed").status_code == 201
    folders = client.app.state.mosaic.cache.folders
    body = json.dumps({"model": "streamed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       "stream": True}).encode()
    held_while_sending: list[int] = []

    async def call() -> None:
        done = asyncio.Event()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "query_string": b"",
                 "raw_path": b"/v1/chat/completions", "root_path": "", "client": LOCAL, "server": ("127.0.0.1", 80),
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():
            if (message := next(messages, None)) is not None:
                return message
            await done.wait()  # the client stays until the whole response has come
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                if message.get("body"):
                    held_while_sending.append(folders.held())
                if not message.get("more_body"):
                    done.set()

        await client.app(scope, receive, send)

    client.portal.call(call)
    assert len(held_while_sending) >= 3 and min(held_while_sending) == 1, held_while_sending
    # let go of once the request's last references are gone: the engine's output task may end a moment after the
    # last event on a loaded machine, so wait (bounded) rather than read it at once
    deadline = time.monotonic() + 20
    while True:
        gc.collect()
        if folders.held() == 0 or time.monotonic() > deadline:
            break
        client.portal.call(asyncio.sleep, 0.1)
    assert folders.held() == 0
    assert client.delete("/v1/adapters/streamed").status_code == 200
