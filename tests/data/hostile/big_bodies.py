"""Request bodies too big to commit (issue 26's exact requests: megabytes of token ids, thousands of
prompts, messages or examples), built when a test asks for them, each with the status it must get.

Each case is ``(what, method, path, body, status)`` with ``body`` the bytes sent as ``application/json``;
``BASE`` is the model id the server serves."""

from __future__ import annotations

import json
from collections.abc import Callable

MiB = 2**20


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _ids_filling(size: int) -> list[int]:
    return [1] * ((size - 64) // 2)  # "1," per id, under ``size`` bytes with the envelope


def cases(base: str) -> list[tuple[str, str, str, bytes, int]]:
    chat = {"model": base, "max_tokens": 1}
    part = {"role": "user", "content": [{"type": "text", "text": "x"}]}
    made: list[tuple[str, str, str, Callable[[], object], int]] = [
        ("a completions prompt of 1,000,000 token ids (2 MB)", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": [1] * 1_000_000}, 413),
        ("a completions prompt of token ids filling 8 MiB", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": _ids_filling(8 * MiB)}, 413),
        ("/tokenize with 1,000,000 token ids", "POST", "/tokenize",
         lambda: {"model": base, "prompt": [1] * 1_000_000}, 413),
        ("a completions prompt of 100,000 token ids (within the JSON budget)", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": [1] * 100_000}, 400),
        ("60,000 prompts of one token id each", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": [[1]] * 60_000}, 400),
        ("/detokenize with 100,000 token ids", "POST", "/detokenize",
         lambda: {"model": base, "tokens": [1] * 100_000}, 400),
        ("n=16384 × max_tokens 2048 with ignore_eos (33.5M tokens)", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": "hi", "n": 16384, "max_tokens": 2048, "ignore_eos": True}, 400),
        ("1,024 prompts × n=16", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": ["hi"] * 1024, "n": 16, "max_tokens": 2048}, 400),
        ("32 prompts × n=16 × max_tokens 2048", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": ["hi"] * 32, "n": 16, "max_tokens": 2048}, 400),
        ("beam search 64 wide", "POST", "/v1/completions",
         lambda: {"model": base, "prompt": "hi", "n": 64, "use_beam_search": True, "max_tokens": 4}, 400),
        ("a chat of 20,000 messages with content parts", "POST", "/v1/chat/completions",
         lambda: {**chat, "messages": [part] * 20_000}, 400),
        ("a chat whose one message is 8 million characters", "POST", "/v1/chat/completions",
         lambda: {**chat, "messages": [{"role": "user", "content": "a" * 8_000_000}]}, 400),
        ("a learned-weight search seeded with 2^32 (the stateful fuzz found it: accepted, then the job failed)", "POST",
         "/v1/compositions", lambda: {"name": "hostile-seed", "skills": ["a", "b"], "quality_prompts": 0,
                                       "optimize": {"examples": [{"prompt": "p", "answer": "a"}], "seed": 2**32}}, 400),
        ("a composition with 780,000 example prompts", "POST", "/v1/compositions",
         lambda: {"name": "hostile-examples", "skills": ["a", "b"], "examples": ["x"] * 780_000}, 413),
    ]
    return [(what, method, path, _json(make()), status) for what, method, path, make, status in made]
