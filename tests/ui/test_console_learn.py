"""The compose form's examples reader (server/edge/ui/static/learn.js, run in Node, no browser) against the CLI's
(server/cli/learn.py ``read_examples``, what ``mosaic compose --learn`` reads): every line accepted or refused
alike, the same examples, the same first bad line; and the loss curve's scaling. Skipped where Node is missing."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lora.errors import InvalidRequestError
from server.cli.learn import read_examples
from server.edge.ui import STATIC
from server.jobs.learn_composition import LearnExample

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs node to run the console's module")

CHAT = lambda *turns: json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})  # noqa: E731
GOOD = [
    '{"prompt": "Say hi.", "answer": "hi"}',
    CHAT(("user", "Say yes."), ("assistant", "yes")),
    '{"prompt": "Say no.", "completion": "no"}',
    '{"prompt": "p", "completion": "from completion", "answer": "not this"}',
    json.dumps({"messages": json.loads(CHAT(("user", "q"), ("assistant", "a")))["messages"], "meta": 1}),
    '{"prompt": " ", "answer": " "}',
    '{"prompt": "\\u00e9t\\u00e9 \u2603", "answer": "\u00fc"}',
]
BAD = [
    "{not json", "[1, 2]", "null", '"text"', "{}", '{"prompt": "p"}', '{"answer": "a"}',
    '{"prompt": "p", "answer": ""}', '{"prompt": "", "answer": "a"}', '{"prompt": 3, "answer": "a"}',
    '{"prompt": "p", "answer": "a", "extra": 1}', '{"prompt": "p", "answer": NaN}', '{"messages": []}',
    '{"messages": "x"}', CHAT(("user", "q")), CHAT(("assistant", "a")),
    CHAT(("system", "be brief"), ("user", "q"), ("assistant", "a")),
    CHAT(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")),
    CHAT(("tool", "x"), ("assistant", "a")), CHAT(("user", "q"), ("assistant", "")),
    '{"prompt": "p", "completion": 3}', '{"completion": "c"}',
]


def _node(call: str, data) -> object:
    """``call`` (an expression over ``m``, the module, and ``data``) evaluated in Node; its JSON."""
    script = ("import { readFileSync } from 'node:fs';"
              f"const m = await import({json.dumps((STATIC / 'learn.js').as_uri())});"
              "const data = JSON.parse(readFileSync(0, 'utf8'));"
              f"process.stdout.write(JSON.stringify({call}));")
    done = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(data), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _python(tmp_path, text: str) -> tuple[list[dict], int | None]:
    """The CLI reader's examples, and the first bad line it names (None: none)."""
    path = tmp_path / "examples.jsonl"
    path.write_text(text, encoding="utf-8")
    try:
        return [e.model_dump() for e in read_examples(path)], None
    except InvalidRequestError as exc:
        if "holds no examples" in exc.message:
            return [], None
        return [], int(exc.message.split("line ", 1)[1].split(":", 1)[0])


def test_each_line_is_read_alike_by_the_console_and_the_cli(tmp_path):
    lines = GOOD + BAD
    browser = _node("data.map((t) => m.parseExamples(t))", lines)
    for line, got in zip(lines, browser):
        expected, bad = _python(tmp_path, line + "\n")
        assert (got["bad"] is not None) == (bad is not None) == (line in BAD), (line, got)
        assert got["examples"] == expected and all(LearnExample(**e) for e in got["examples"]), line


@pytest.mark.parametrize("at", [0, 3, len(GOOD)])
def test_a_file_names_the_same_first_bad_line(tmp_path, at):
    rows = GOOD[:at] + ["", "   "] + [BAD[at % len(BAD)], BAD[-1]] + GOOD[at:]
    text = "\r\n".join(rows) if at == 3 else "\n".join(rows)  # Windows line ends too
    got = _node("m.parseExamples(data)", text)
    _, bad = _python(tmp_path, text)
    assert bad == at + 3 and got["bad"]["line"] == bad and len(got["examples"]) == at, got
    whole = "\n".join(GOOD) + "\n\n"
    assert _node("m.parseExamples(data)", whole) == {"examples": _python(tmp_path, whole)[0], "bad": None}


def test_the_loss_curve_spans_its_box():
    curve = [[1, 2.0, 3.0], [2, 1.9, 2.0], [3, 1.8, 2.5]]
    points = _node("m.curvePoints(data, 4, 320, 90)", curve)
    width, height, pad = 320, 90, 4
    x = [pad + (width - 2 * pad) * s / 4 for s, _, _ in curve]
    y = [pad + (height - 2 * pad) * (3.0 - v) / (3.0 - 2.0) for _, _, v in curve]
    assert [c for p in points for c in p] == pytest.approx([c for p in zip(x, y) for c in p])
    assert points[1][1] == pytest.approx(height - pad) and points[0][1] == pytest.approx(pad)  # lowest loss: bottom
    one = _node("m.curvePoints(data, 1, 320, 90)", [[1, 1.0, 0.5]])
    assert one == [[width - pad, height / 2]]  # one point: at its step, mid-height
