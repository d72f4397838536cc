"""``mosaic compose``: skills composed into one adapter, stored as a new skill or written to a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from composer.fusion import Granularity
from server.cli import learn as learning
from server.cli.common import base_spec, fail, out, print_json, registry, settings
from server.cli.skills import quality_line
from server.jobs.expansion import ExpandOptions
from server.jobs.learn_composition import LearnOptions


def compose(
    ctx: typer.Context,
    skills: Annotated[Optional[str], typer.Option(help="comma-separated skill names (name or name@version)")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="comma-separated weights, one per skill (default 1 each), or 'auto': chosen per prompt (with --name)")] = None,
    method: Annotated[str, typer.Option(help="merge method (see --list-methods)")] = "linear",
    rank: Annotated[Optional[str], typer.Option(help="target rank, or 'auto' (exact)")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="a method parameter KEY=VALUE (repeatable)")] = None,
    weighting: Annotated[str, typer.Option(help="'none' or 'varm' (per-module weights from each skill's ‖ΔW‖²)")] = "none",
    lines: Annotated[Optional[str], typer.Option(help="LiNeS 'ALPHA,BETA': scale layer l by ALPHA + BETA(l-1)/(L-1)")] = None,
    name: Annotated[Optional[str], typer.Option(help="store the result as this new skill")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="write the result as a PEFT folder here")] = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list the merge methods and exit")] = False,
    quality_prompts: Annotated[int, typer.Option(
        min=0, max=64, help="with --name: example prompts per input skill for the quality report (0: none)")] = 8,
    min_agreement: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="with --name: refuse to store if some input skill's own answer is kept on less than "
        "this share of its example prompts")] = None,
    optimize: Annotated[bool, typer.Option(
        "--optimize", help="with --name: learn the weights (LoraHub) from --optimize-examples, or from each skill's "
        "example prompts and its own answers")] = False,
    optimize_examples: Annotated[Optional[Path], typer.Option(
        help="JSON list or JSONL: {\"prompt\", \"answer\"} objects, or prompts alone")] = None,
    budget: Annotated[int, typer.Option(min=1, max=2000, help="--optimize: loss evaluations")] = 40,
    l1: Annotated[float, typer.Option(min=0.0, help="--optimize: λ of the L1 penalty on the weights")] = 0.05,
    learn: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="with --name: learn fusion weights (and optionally a residual LoRA) from "
        "these examples, JSONL of {\"prompt\", \"answer\"} or chats, and report against baselines")] = None,
    granularity: Annotated[Optional[Granularity], typer.Option(help=(
        learning.described(LearnOptions, "granularity", "--learn: ")))] = None,
    steps: Annotated[Optional[int], typer.Option(help=learning.described(LearnOptions, "steps", "--learn: "))] = None,
    expand_rank: Annotated[Optional[int], typer.Option(help="--learn: train a residual LoRA of this rank on top of "
                                                       "the fusion and store that (default: none)")] = None,
    expand_steps: Annotated[Optional[int], typer.Option(help=learning.described(
        ExpandOptions, "steps", "--expand-rank: "))] = None,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help=(
        "--learn: score only what is learned, not the baselines (each skill alone, fixed merge, context-aware, "
        "from scratch)"))] = False,
    min_validation: Annotated[bool, typer.Option("--min-validation", help=(
        "--learn: " + LearnOptions.model_fields["min_validation"].description))] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compose skills into one adapter, stored as a new skill (--name) or written to a folder (--out).

    A stored composition gets a quality report (agreement with each input skill's own greedy answers on
    its example prompts), computed here with the transformers reference engine. With --learn, the weights
    are learned from examples instead (as the server's learn jobs do) and the skill keeps that report."""
    from pydantic import ValidationError

    from composer import Composition

    if list_methods:
        _list_methods(as_json)
        return
    if not skills:
        fail("--skills is required (e.g. --skills a,b)", 2)
    learning.check_arguments(learn, out_dir=out_dir, optimize=optimize or optimize_examples is not None, tuning={
        "--granularity": granularity, "--steps": steps, "--expand-rank": expand_rank, "--expand-steps": expand_steps,
        "--no-baselines": no_baselines, "--min-validation": min_validation})
    if (name is None) == (out_dir is None):
        fail("give exactly one of --name NEW (store as a skill) or --out DIR (write a folder)", 2)
    try:
        comp = Composition(
            skills=tuple(s.strip() for s in skills.split(",") if s.strip()),
            weights=_parse_weights(weights),
            method=method, params=_parse_params(param or []), rank=rank, weighting=weighting,
            lines=tuple(float(x) for x in lines.split(",")) if lines else None,
        )
    except (ValidationError, ValueError) as exc:
        fail(f"bad composition: {exc}", 2)
    if comp.context_aware and out_dir is not None:
        fail("--weights auto chooses weights per prompt: store it with --name (a folder has fixed weights)", 2)
    if (optimize or optimize_examples) and (out_dir is not None or comp.context_aware):
        fail("--optimize learns fixed weights for a stored skill: use it with --name and without --weights auto", 2)
    if learn is not None:
        given = ctx.get_parameter_source("quality_prompts")
        learning.check_composition(comp, min_agreement, given is not None and given.name == "COMMANDLINE")
        options = learning.learn_options(learn, granularity=granularity, steps=steps, expand_rank=expand_rank,
                                         expand_steps=expand_steps, baselines=not no_baselines,
                                         min_validation=min_validation)
        result, table = learning.learn_and_store(comp, name, options, quiet=as_json)
        if as_json:
            print_json(result)
        else:
            out.print(table)
        return
    options = None
    if optimize or optimize_examples:
        from server.jobs.learned_weights import OptimizeOptions

        try:
            options = OptimizeOptions(examples=_read_examples(optimize_examples) if optimize_examples else [],
                                      budget=budget, l1=l1)
        except (ValidationError, ValueError, OSError) as exc:
            fail(f"bad --optimize-examples: {exc}", 2)
    if name is not None:
        result, message = _store(comp, name, options, quality_prompts, min_agreement)
    else:
        result, message = _write(comp, out_dir)
    if as_json:
        print_json(result)
    else:
        out.print(message)


def _list_methods(as_json: bool) -> None:
    from composer import METHODS

    rows = [
        {"name": m.name, "space": m.space, "params": {k: f"{p.type.__name__}={p.default!r}: {p.help}" for k, p in m.params.items()},
         "reference": m.reference, "description": m.description}
        for m in METHODS.values()
    ]
    if as_json:
        print_json(rows)
        return
    table = Table("method", "space", "parameters", "reference")
    for r in rows:
        table.add_row(r["name"], r["space"], "; ".join(f"{k} ({v})" for k, v in r["params"].items()) or "-", r["reference"])
    out.print(table)


def _store(comp, name: str, options, quality_prompts: int, min_agreement: float | None) -> tuple[dict, str]:
    """Store ``comp`` as the new skill ``name``, with its quality report (and learned weights, given ``options``)."""
    import asyncio

    from router.policy import routable
    from server.core.base_model import prepare
    from server.core.state import make_policy
    from server.jobs.library import create_and_store
    from server.jobs.quality import reference_answerer

    s = settings()
    reg = registry()
    policy = make_policy(s, reg)

    def weigh(c):
        async def plan(text: str):
            skills = routable(reg.list())
            return await asyncio.to_thread(policy.route_within, text, c, skills, reg.generation())
        return plan

    extra = None
    if options is not None:
        comp, extra = _optimize(reg, comp, options, policy, s)
    with out.status("composing and measuring the quality report (reference engine)…"):
        info = asyncio.run(create_and_store(
            reg, base_spec(), comp, name, max_rank=s.max_adapter_rank,
            answer=reference_answerer(reg, prepare(s, quiet=True), s.max_adapter_rank),
            weigh=weigh, engine="hf", quality_prompts=quality_prompts, min_agreement=min_agreement, extra=extra))
    return info.model_dump(), f"stored [bold]{info.ref}[/] (rank {info.rank})" + quality_line(info)


def _write(comp, out_dir: Path) -> tuple[dict, str]:
    """Write ``comp`` (fixed weights) as a PEFT folder."""
    from composer import compose as do_compose

    reg = registry()
    adapters = [reg.load(ref)[1] for ref in comp.skills]
    adapter, report = do_compose(adapters, **comp.compose_kwargs())
    adapter.save_dir(out_dir)
    result = {"out": str(out_dir), "rank": report.rank, "sha256": adapter.sha256()}
    return result, f"wrote rank-{report.rank} adapter to {out_dir}"


def _optimize(reg, comp, options, policy, s):
    """LoraHub's search with a progress bar; returns the composition with the learned weights and the record."""
    import numpy as np
    from rich.progress import Progress

    from router.policy import routable
    from server.core.base_model import prepare
    from server.jobs.learned_weights import LossModel, optimize_composition, optimize_record

    def pick_for(template):
        skills = routable(reg.list())
        return lambda prompt: int(np.argmax(policy.route_within(prompt, template, skills, 0).alpha))

    with out.status("loading the base model for the weight search…"):
        model = LossModel(prepare(s, quiet=True))
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("searching weights", total=options.budget)

        def progress(done, trial, best):
            bar.update(task, completed=done, description=f"best {best.objective:.3f} at {best.weights}")

        learned, result = optimize_composition(reg, comp, options, model, pick_for, max_rank=s.max_adapter_rank,
                                               progress=progress)
    return learned, {"optimize": optimize_record(options, result)}


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--param takes KEY=VALUE, got {item!r}", 2)
        params[key] = value
    return params


def _parse_weights(raw: str | None) -> tuple[float, ...] | str | None:
    if not raw:
        return None
    if raw.strip() == "auto":
        return "auto"
    try:
        return tuple(float(w) for w in raw.split(","))
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers or 'auto', got {raw!r}") from None


def _read_examples(path: Path) -> list:
    """A JSON list, or JSON Lines, of {"prompt", "answer"} objects or prompts alone."""
    text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(value, list):
        raise ValueError("expected a JSON list or JSON Lines")
    return value
