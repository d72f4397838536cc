"""Reading a skill's training data: JSONL of chat examples, checked line by line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora.errors import InvalidRequestError

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    messages: list[dict]  # the conversation up to (not including) the answer
    answer: str
    line: int

    @property
    def prompt(self) -> str:
        """The last user turn (what the router's examples are made of)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def _parse(obj: object, line: int) -> Example:
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError("every message needs a role (system/user/assistant) and a string content")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise ValueError("there must be a user message before the answer")
        return Example(messages=msgs[:-1], answer=msgs[-1]["content"], line=line)
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return Example(messages=[{"role": "user", "content": obj["prompt"]}], answer=obj["completion"], line=line)
    raise ValueError("expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")


def read_jsonl(path: str | Path, tokenizer=None, max_tokens: int | None = None) -> list[Example]:
    """All examples of ``path``; every bad line is reported (line numbers from 1), up to 20."""
    path = Path(path)
    if not path.exists():
        raise InvalidRequestError(f"{path} does not exist", param="data")
    problems: list[str] = []
    out: list[Example] = []
    for i, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            ex = _parse(json.loads(raw), i)
        except (json.JSONDecodeError, ValueError) as exc:
            problems.append(f"{path.name} line {i}: {exc}")
            continue
        if not ex.answer.strip():
            problems.append(f"{path.name} line {i}: the answer is empty")
            continue
        if tokenizer is not None and max_tokens is not None:
            text = tokenizer.apply_chat_template(ex.messages + [{"role": "assistant", "content": ex.answer}], tokenize=False)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > max_tokens:
                problems.append(f"{path.name} line {i}: {n} tokens, more than the limit of {max_tokens}")
                continue
        out.append(ex)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise InvalidRequestError("training data refused: " + "; ".join(problems), param="data")
    if not out:
        raise InvalidRequestError(f"{path} holds no examples", param="data")
    return out
