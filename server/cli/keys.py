"""``mosaic keys``: API keys, stored hashed in Redis."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from server.cli.common import fail, out, print_json, registry, settings

if TYPE_CHECKING:
    from adapter_store.keys import KeyStore

app = typer.Typer(help="API keys (stored hashed in Redis).", no_args_is_help=True)


def _keys() -> KeyStore:
    from adapter_store.keys import KeyStore

    reg = registry()
    return KeyStore(reg.r, prefix=settings().redis_prefix, high_water=reg.high_water)


@app.command("create")
def create(
    name: str,
    scope: Annotated[Optional[list[str]], typer.Option("--scope", help="admin, read and/or inference (repeatable; admin implies the others)")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="limit the key to skills named NAMESPACE/…")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    store = _keys()
    try:
        key, info = store.create(name, scope or ["inference"], namespace=namespace)
    except ValueError as exc:  # a bad name, scope or namespace, or a name in use: the arguments are wrong
        fail(str(exc), 2)
    if as_json:
        print_json({**info.model_dump(), "key": key})
    else:
        limited = f", skills named {info.namespace}/… only" if info.namespace else ""
        out.print(f"key {info.name} ({', '.join(info.scopes)}{limited}): [bold]{key}[/]\nstore it now: it cannot be shown again")


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (names, scopes, prefixes; never the keys)."""
    infos = _keys().list()
    if as_json:
        print_json([i.model_dump() for i in infos])
        return
    table = Table("name", "scopes", "namespace", "prefix", "created")
    for i in infos:
        table.add_row(i.name, ",".join(i.scopes), i.namespace or "(all)", i.prefix + "…",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)))
    out.print(table if infos else "no keys: admin endpoints are open unless MOSAIC_API_KEY is set")


@app.command("revoke")
def revoke(name: str) -> None:
    """Revoke a key by name (effective on the next request, on every replica)."""
    info = _keys().revoke(name)
    out.print(f"revoked {info.name}")
