"""Section 10, the library at scale: 100 to 10,000 tiny synthetic skills in the real Redis with the real
router: uploads, listing, Redis bytes per skill, route latency, held-out accuracy, the longest wait through
a library change and the time until a new skill is routable (bench/scale.py, which also writes
scale[_quick].{json,md}), beside the logistic-regression router it replaced (bench/reports/scale_lr.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.sections import REPORTS, suffix


def _before() -> list[dict]:
    path = REPORTS / "scale_lr.json"
    return json.loads(path.read_text()) if path.exists() else []


def run(args: argparse.Namespace) -> dict:
    import redis

    from bench import scale
    from server.core.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    rows = [scale.measure(client, n, 20 if args.quick else 200) for n in ([100] if args.quick else [100, 1000, 10000])]
    (REPORTS / f"scale{suffix(args.quick)}.json").write_text(json.dumps(rows, indent=2))
    (REPORTS / f"scale{suffix(args.quick)}.md").write_text(scale.report_md(rows))
    return {"rows": rows, "before": _before()}


def render(res: dict, quick: bool) -> tuple[list[str], list[str]]:
    from bench import scale

    rows, before = res["rows"], res.get("before", [])
    L = ["## 10. The library at scale", "", *scale.report_md(rows).split("\n")[2:]]
    if before:
        L += ["Before (commit fc40a94: the multinomial logistic regression over every skill, trained in a thread "
              "of the serving process; three example prompts per skill, 50 held-out prompts):", "",
              "| skills | route p50 / p95 (ms) | held-out accuracy | wait after a change (s) | new skill routable after (s) |",
              "|---|---|---|---|---|"]
        L += [f"| {b['skills']:,} | {b['route_p50_ms']:.1f} / {b['route_p95_ms']:.1f} | {b['held_out_accuracy']:.0%} | "
              f"{b['waited_after_change_s']:.2f} | "
              f"{b['new_skill_routable_s']:.1f} |" if b["new_skill_routable_s"] is not None else
              f"| {b['skills']:,} | {b['route_p50_ms']:.1f} / {b['route_p95_ms']:.1f} | {b['held_out_accuracy']:.0%} | "
              f"{b['waited_after_change_s']:.2f} | never (600 s) |" for b in before]
        L.append("")
    L += [f"![scale](scale{suffix(quick)}.png)", ""]
    big = rows[-1]
    headline = [f"| router at {big['skills']:,} skills | route p50 {big['route_p50_ms']:.1f} ms, p95 "
                f"{big['route_p95_ms']:.1f} ms; held-out {big['held_out_accuracy']:.0%} exactly its skill; new skill "
                f"routable after {scale._routable(big['new_skill_routable_s'])} s (goals ≤ 15 / 30 ms, ≤ 30 s) |"]
    return L, headline


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, before = res["rows"], res.get("before", [])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [("retrieve-then-compose", rows, "tab:blue", "o"), ("LR over every skill (before)", before, "tab:orange", "s")]
    for label, rs, color, marker in series:
        if not rs:
            continue
        n = [r["skills"] for r in rs]
        axes[0].plot(n, [r["route_p50_ms"] for r in rs], marker=marker, color=color, label=f"{label} p50")
        axes[0].plot(n, [r["route_p95_ms"] for r in rs], marker=marker, color=color, ls="--", label=f"{label} p95")
        axes[1].plot(n, [100 * r["held_out_accuracy"] for r in rs], marker=marker, color=color, label=label)
        if all("held_out_nearest" in r for r in rs):
            axes[1].plot(n, [100 * r["held_out_nearest"] for r in rs], marker=marker, color=color, ls="--",
                         label=f"{label}: its skill nearest")
        ok = [(x, r["new_skill_routable_s"]) for x, r in zip(n, rs) if r["new_skill_routable_s"] is not None]
        axes[2].plot([x for x, _ in ok], [s for _, s in ok], marker=marker, color=color, label=label)
        for x, r in zip(n, rs):
            if r["new_skill_routable_s"] is None:
                axes[2].scatter([x], [600], marker="x", color=color, s=60)
    axes[0].axhline(15, color="grey", lw=0.8, ls=":")
    axes[0].axhline(30, color="grey", lw=0.8, ls=":")
    axes[2].axhline(30, color="grey", lw=0.8, ls=":")
    for ax, title, unit in zip(axes, ["route latency", "held-out accuracy", "new skill routable after"],
                               ["ms", "% routed to exactly its skill", "s (x: never within 600 s)"]):
        ax.set_xscale("log")
        ax.set_xlabel("skills in the library")
        ax.set_ylabel(unit)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
