"""``python -m server.cli``: the same as the ``mosaic`` command."""

from server.cli import main

main()
