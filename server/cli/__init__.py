"""The ``mosaic`` command line: a thin layer over the functions the server uses.

One module per command group; a :class:`MosaicError` from any command is reported here, once,
as ``error: MESSAGE`` on stderr with exit status 1.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from lora.errors import MosaicError
from server.cli import base, keys, skills
from server.cli.common import fail
from server.cli.compose import compose
from server.cli.route import route, router_app
from server.cli.serve import serve


class _Commands(TyperGroup):
    """The root group: turns a MosaicError raised by any command into one line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MosaicError as exc:
            fail(str(exc))


app = typer.Typer(cls=_Commands, help="Mosaic: a LoRA adapter composition server.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(skills.app, name="skills")
app.add_typer(base.app, name="base")
app.command()(serve)
app.command()(compose)
app.add_typer(router_app, name="router")
app.command()(route)
app.add_typer(keys.app, name="keys")


def main() -> None:
    app()
