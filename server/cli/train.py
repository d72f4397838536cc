"""``mosaic skills train``: the arguments and the progress bar; the work is :mod:`server.jobs.training`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from server.cli.common import base_spec, err, fail, out, print_json, registry, settings


def train(
    data: Annotated[Path, typer.Argument(help="JSONL: {\"messages\": [...]} or {\"prompt\", \"completion\"} per line")],
    name: Annotated[str, typer.Option("--name", help="the new skill's name")],
    description: Annotated[Optional[str], typer.Option(help="what the skill does (default: from the data)")] = None,
    rank: Annotated[int, typer.Option(min=1, max=256)] = 8,
    alpha: Annotated[int, typer.Option(min=1)] = 16,
    targets: Annotated[str, typer.Option(help="comma-separated target modules")] = "q_proj,k_proj,v_proj,o_proj",
    steps: Annotated[int, typer.Option(min=1)] = 40,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-3,
    batch: Annotated[int, typer.Option(min=1)] = 8,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="held out for the exact-match check")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="refuse examples longer than this (tokens)")] = 512,
    init_from: Annotated[Optional[str], typer.Option(help="start from a composition of these skills (comma-separated, PSEC reuse)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train a new LoRA skill on the base model from chat examples and register it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from adapter_store.validation import check_name
    from server.core.base_model import base_model_id, prepare
    from server.jobs.training import plan_training, train_skill

    if problems := check_name(name):
        fail("; ".join(problems), 2)
    s = settings()
    reg = registry()
    base = prepare(s, quiet=True)
    plan = plan_training(reg, base, data, max_tokens=max_tokens, val_fraction=val_fraction, seed=seed,
                         init_from=init_from, rank=rank)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, disable=as_json) as bar:
        task = bar.add_task(f"training {name}", total=steps)

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, description=f"training {name} (loss {loss:.3f})")

        trained = train_skill(
            reg, base, plan, name, spec=base_spec(), max_rank=s.max_adapter_rank, base_model_id=base_model_id(s),
            description=description, rank=rank, alpha=alpha, steps=steps, lr=lr, batch=batch, seed=seed,
            targets=[t.strip() for t in targets.split(",") if t.strip()], on_step=on_step)
    if as_json:
        print_json(trained.record())
        return
    score, n_val = trained.val_exact_match, len(plan.val)
    out.print(f"stored [bold]{trained.info.ref}[/] (rank {rank}, {len(plan.train)} examples, {steps} steps); "
              + (f"validation exact match {score:.1%} on {n_val}" if score is not None else "no validation split"))
