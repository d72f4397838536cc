"""``mosaic route`` (the router's decision for a prompt) and ``mosaic router`` (its training)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from server.cli.common import fail, out, print_json, registry, settings

router_app = typer.Typer(help="The router behind model=\"auto\".", no_args_is_help=True)


def route(text: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the router's decision for TEXT, without generating."""
    from router.policy import routable
    from server.core.state import make_policy

    reg = registry()
    plan = make_policy(settings(), reg).route(text, routable(reg.list()), reg.generation())
    if as_json:
        print_json(plan.model_dump(mode="json"))
        return
    what = plan.skill if plan.kind == "skill" else (
        ", ".join(f"{w:g}×{s}" for s, w in zip(plan.composition.skills, plan.composition.weights)) if plan.composition else "")
    out.print(f"[bold]{plan.kind}[/] {escape(what)}  ({escape(plan.reason)})")
    table = Table("skill", "α", "similarity")
    for k, v in sorted(plan.scores.items(), key=lambda kv: -kv[1])[:8]:
        table.add_row(k, f"{v:.3f}", f"{plan.similarity.get(k, float('nan')):.3f}")
    if plan.scores:
        out.print(table)


@router_app.command("train")
def router_train() -> None:
    """Retrain the router on the current library now (it also retrains by itself when the library changes)."""
    from router.policy import routable
    from server.core.state import make_policy

    reg = registry()
    policy = make_policy(settings(), reg)
    if not hasattr(policy, "train"):
        fail(f"the {policy.name} router (MOSAIC_ROUTER) has no model to train")
    # the skills the server routes among, so that it finds this model under the same key
    model = policy.train(routable(reg.list()))
    out.print(f"trained on {len(model.names)} skills ({len(model.y)} profile texts) in {model.trained_seconds:.2f} s; "
              f"stored as {model.key}")
