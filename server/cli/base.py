"""``mosaic base``: the base model."""

from __future__ import annotations

import typer

from server.cli.common import fail, settings

app = typer.Typer(help="The base model.", no_args_is_help=True)


@app.command("prepare")
def prepare_base() -> None:
    """Prepare the base model (converts the bundled GGUF once) and print its folder."""
    from server.core.base_model import prepare

    try:
        path = prepare(settings(), quiet=False)
    except FileNotFoundError as exc:
        fail(str(exc))
    print(path)
