"""The rooms' import rules, read from the code: arrows point one way (server → router → composer →
adapter_store → lora, and inside server: cli → ray → api → front → jobs → edge → core), and the math rooms
load neither Redis nor HTTP."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each room may import only those before it
ROOMS = ["lora", "adapter_store", "composer", "router",
         "server.core", "server.edge", "server.jobs", "server.front", "server.api", "server.ray", "server.cli"]
SERVER_ROOMS = {r.split(".")[1] for r in ROOMS if r.startswith("server.")}


def _room(module: str) -> str:
    """The room of a dotted module name (``server.core.engine`` → ``server.core``; a package outside Mosaic
    → its own top-level name)."""
    parts = module.split(".")
    if parts[0] == "server" and len(parts) > 1 and parts[1] in SERVER_ROOMS:
        return ".".join(parts[:2])
    return parts[0]


def _imported(path: Path) -> set[str]:
    """Every module a file imports (``from a.b import c`` counts ``a.b`` and ``a.b.c``), at any level."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _imports(path: Path) -> set[str]:
    """The rooms (or outside packages) a file imports."""
    return {_room(m) for m in _imported(path)}


def _modules(room: str) -> list[Path]:
    return sorted((ROOT / room.replace(".", "/")).rglob("*.py"))


def test_every_module_is_in_a_room():
    loose = [p.name for p in (ROOT / "server").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"server/ modules outside its rooms: {loose}"


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
    ("router", {"redis", "fastapi", "starlette", "vllm"}),  # its shared state goes through the registry's parts
])
def test_the_inner_rooms_import_no_redis_and_no_http(room, banned):
    found = {f"{path.relative_to(ROOT)}: {name}" for path in _modules(room) for name in _imports(path) & banned}
    assert not found, sorted(found)


def test_importing_the_composer_loads_no_redis():
    """What the source says, checked in a fresh interpreter: nothing the composer imports brings Redis in."""
    code = "import sys, composer, lora; print(sorted(m for m in ('redis', 'fastapi', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_layout_md_is_current():
    """docs/LAYOUT.md is what scripts/layout.py writes from the code now: every module listed with its docstring,
    every room's arrows as its imports say."""
    out = subprocess.run([sys.executable, "scripts/layout.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
