"""The rooms' import rules, read from the code: arrows point one way (server → router → composer →
adapter_store → lora), and the math rooms load neither Redis nor HTTP."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ["lora", "adapter_store", "composer", "router", "server"]  # each may import only those before it


def _imports(path: Path) -> set[str]:
    """Every top-level package a module imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _modules(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def test_every_arrow_points_down():
    up = []
    for rank, room in enumerate(ROOMS):
        assert _modules(room), room
        for path in _modules(room):
            for name in _imports(path) & set(ROOMS):
                if ROOMS.index(name) > rank:
                    up.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not up, "\n".join(up)


@pytest.mark.parametrize("room, banned", [
    ("lora", {"redis", "fastapi", "starlette", "vllm", "adapter_store", "composer", "router", "server"}),
    ("composer", {"redis", "fastapi", "starlette", "vllm"}),
])
def test_the_math_rooms_import_no_redis_and_no_http(room, banned):
    found = {f"{path.relative_to(ROOT)}: {name}" for path in _modules(room) for name in _imports(path) & banned}
    assert not found, sorted(found)


def test_importing_the_composer_loads_no_redis():
    """What the source says, checked in a fresh interpreter: nothing the composer imports brings Redis in."""
    code = "import sys, composer, lora; print(sorted(m for m in ('redis', 'fastapi', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
