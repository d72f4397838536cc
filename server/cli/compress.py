"""``mosaic skills compress``: the library as MoS shard pools, its options generated from
:class:`CompressOptions` (the body of ``POST /v1/admin/compress``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from adapter_store.compression import CompressOptions, CompressReport
from server.cli.common import err, out, print_json, registry
from server.cli.options import model_options


@model_options(CompressOptions)
def compress(
    options: CompressOptions,
    off: Annotated[bool, typer.Option("--off", help="store every skill exact again and stop encoding uploads")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Store the library as MoS shard pools plus per-skill index tables (or refresh the pools).

    Uploads from then on are encoded against the pools; a skill that cannot meet the error budget stays
    exact. Safe while the server runs: each skill moves in its own transaction."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from adapter_store.compression import compress_library, decompress_library

    reg = registry()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        if off:
            changed = decompress_library(reg, progress)
        else:
            report = compress_library(reg, options, progress)
    if off:
        if as_json:
            print_json({"changed": changed})
        else:
            out.print(f"stored exact again: {changed} versions changed; uploads are stored exact from now on")
    elif as_json:
        print_json({**report.model_dump(), "ratio": report.ratio})
    else:
        _print_report(report)


def _print_report(report: CompressReport) -> None:
    shards = [r for r in report.versions if r["stored"] == "shards"]
    errors = [r["error"] for r in shards]
    table = Table("", "before", "after")
    table.add_row("weights in Redis", f"{report.bytes_before:,} bytes", f"{report.bytes_after:,} bytes"
                  f" ({report.ratio:.1f}× smaller; pools {report.pool_bytes:,})")
    table.add_row("versions", str(len(report.versions)),
                  f"{len(shards)} in shards, {len(report.versions) - len(shards)} exact (over budget)")
    if errors:
        table.add_row("relative error", "0", f"mean {sum(errors) / len(errors):.3f}, max {max(errors):.3f}"
                      f" (budget {report.options.error_budget:g})")
    out.print(table)
    out.print(f"pools v{report.pool_version} in {report.seconds:.1f} s"
              + (f"; collected old pools {report.collected_pools}" if report.collected_pools else ""))
