"""What every command group shares: the consoles, the one way to fail, and the library it works on."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from adapter_store.registry import Registry
    from adapter_store.validation import BaseModelSpec
    from server.core.settings import Settings

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code`` (2: the arguments are wrong)."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def settings() -> Settings:
    from server.core.settings import get_settings

    return get_settings()


def registry() -> Registry:
    from server.core.state import open_registry

    return open_registry(settings())


def base_spec() -> BaseModelSpec:
    """The base model's shapes, what every adapter is checked against."""
    from adapter_store.validation import BaseModelSpec
    from server.core.base_model import base_model_id, prepare

    s = settings()
    return BaseModelSpec.from_dir(prepare(s), model_id=base_model_id(s))


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
