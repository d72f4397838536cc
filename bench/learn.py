"""Learned compositions on mixed tasks: does composing existing skills beat training from nothing?

    python -m bench.learn [--tasks a,b] [--sizes 5,10,20] [--test 20] [--full-start]

For every mixed task of bench/demo_data.MIXED (prompts that need two or three demo skills at once) and every
number of examples: the server's learning job (server/jobs/learn_composition.py, its defaults: fusion per layer, a
rank-8 residual on top) on that many training-template examples, then exact match on ``--test`` unseen prompts
(test templates, never trained on) for every row of its report: each skill alone, the best fixed merge,
context-aware (the router's per-prompt weights), fusion learned per skill and per layer, expanded, and a LoRA
trained from scratch with the same examples and steps. CPU seconds per row; the per-layer weights as a heat
map. ``--full-start`` adds the expansion that trains the composition's own factors too (PSEC's other start).
Writes bench/reports/learn.md, learn.json and learn.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.demo_data import MIXED, mixed_examples
from bench.scoring import markdown_table, score
from lora.adapter import LoraAdapter

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "bench" / "skills"
REPORTS = ROOT / "bench" / "reports"
ROWS = ["best skill alone", "best fixed merge", "context-aware", "learned per skill", "learned per layer", "expanded",
        "scratch"]
GOALS = {"mean_best_at_10": 0.5, "over_scratch": 0.2, "seconds": 120}


def log(msg: str) -> None:
    print(f"[learn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row_key(row) -> str:
    """The report row's column in the benchmark's table."""
    return {"alone": "best skill alone", "fixed": "best fixed merge", "context": "context-aware",
            "expanded": "expanded", "scratch": "scratch"}.get(row.kind) or row.name


class Bench:
    def __init__(self, test_n: int) -> None:
        from bench.route import demo_profiles
        from router.psec import PsecRouter
        from server.core.base_model import prepare
        from server.core.settings import get_settings
        from server.jobs.learned_weights import LossModel

        self.model = LossModel(prepare(get_settings()))
        self.router, self.profiles = PsecRouter(get_settings().router_config()), demo_profiles()
        self.test_n = test_n

    def weigh(self, skills: list[str]):
        from server.jobs.learn_composition import router_weigher

        return router_weigher(self.router, lambda: (0, self.profiles), skills)

    def exact(self, adapter: LoraAdapter | None, tests: list[tuple[str, str]]) -> float:
        return score(self.model.answers(adapter, [p for p, _ in tests]), [a for _, a in tests])

    def run(self, task: str, n: int, full_start: bool) -> dict:
        from composer import compose
        from server.jobs.learn_composition import LearnOptions, learn_composition

        skills = list(MIXED[task]["skills"])
        adapters = [LoraAdapter.from_dir(SKILLS / s) for s in skills]
        train = mixed_examples(task, "train", n, seed=1)
        tests = mixed_examples(task, "test", self.test_n, seed=3)
        options = LearnOptions(examples=[{"prompt": p, "answer": a} for p, a in train], expand={"rank": 8})
        t0 = time.perf_counter()
        learned = learn_composition(self.model, adapters, skills, options, weigh=self.weigh(skills),
                                    progress=lambda stage, step, *rest: step or log(f"{task} n={n}: {stage}"))
        seconds = time.perf_counter() - t0
        rows: dict[str, dict] = {}
        for row in learned.report.rows:
            key = row_key(row)
            if row.kind == "context":
                continue
            em = self.exact(learned.candidates[row.name], tests)
            if row.kind == "alone" and key in rows and rows[key]["test"] >= em:
                continue
            rows[key] = {"row": row.name, "test": em, "val": row.val_exact_match, "val_loss": row.val_loss,
                         "seconds": row.seconds, "best_step": row.best_step}
        weigh, groups = self.weigh(skills), {}
        for i, (p, _) in enumerate(tests):  # context-aware: each unseen prompt with its own weights
            groups.setdefault(tuple(weigh(p)), []).append(i)
        hits = 0.0
        for w, idx in groups.items():
            adapter = compose(adapters, list(w), method="linear")[0] if any(w) else None
            hits += self.exact(adapter, [tests[i] for i in idx]) * len(idx)
        ctx = next(r for r in learned.report.rows if r.kind == "context")
        rows["context-aware"] = {"row": ctx.name, "test": hits / len(tests), "val": ctx.val_exact_match,
                                 "val_loss": ctx.val_loss, "seconds": ctx.seconds, "best_step": None}
        if full_start:
            from server.jobs.learn_composition import LearnRun

            run = LearnRun(self.model, adapters, skills, options)
            base = learned.candidates["learned per layer"]
            full = run.residual("expand (full)", options.expand.model_copy(update={"start": "full"}), base,
                                "expanded (full start)", "expanded")
            r = run.rows[-1]
            rows["expanded (full start)"] = {"row": r.name, "test": self.exact(full, tests), "val": r.val_exact_match,
                                             "val_loss": r.val_loss, "seconds": r.seconds, "best_step": r.best_step}
        fusion = learned.fusion
        out = {"task": task, "skills": skills, "examples": n, "rows": rows, "seconds": round(seconds, 1),
               "layer_weights": {"groups": list(fusion.groups), "table": [list(r) for r in fusion.table]},
               "stored": learned.report.stored}
        log(f"{task} n={n}: " + ", ".join(f"{k} {v['test']:.2f}" for k, v in rows.items()) + f" ({seconds:.0f} s)")
        return out


def summary(results: list[dict]) -> dict:
    """Per number of examples: the mean test exact match of every row over the tasks, and the goals."""
    out = {}
    for n in sorted({r["examples"] for r in results}):
        these = [r for r in results if r["examples"] == n]
        cols = [c for c in these[0]["rows"]]
        means = {c: sum(r["rows"][c]["test"] for r in these if c in r["rows"]) / len(these) for c in cols}
        best = sum(max(v["test"] for k, v in r["rows"].items() if k in ("learned per layer", "expanded",
                                                                        "learned per skill", "expanded (full start)"))
                   for r in these) / len(these)
        learned_seconds = [r["rows"]["learned per layer"]["seconds"] for r in these]
        out[n] = {"tasks": len(these), "means": means, "best_learned": best,
                  "over_scratch": best - means["scratch"], "max_learn_seconds": max(learned_seconds),
                  "mean_job_seconds": sum(r["seconds"] for r in these) / len(these)}
    return out


def render(results: list[dict], how: str, title: str = "# Learned compositions on mixed tasks") -> list[str]:
    """The report's markdown: one table per number of examples, seconds per row, the goals met or not."""
    summ = summary(results)
    test_n = results[0].get("test", 20) if results else 20
    lines = [
        title, "",
        f"Generated by {how}. Each task needs two or three demo skills in one answer (bench/demo_data.MIXED). The job: "
        "server/jobs/learn_composition.py with its defaults (fusion learned per layer, Adam lr 0.3, at most 60 steps, "
        "patience 4, early stop on a 30 % validation split, then a rank-8 residual LoRA, at most 20 steps). Exact "
        f"match on {test_n} unseen prompts (test templates, never trained on); seconds are wall time on this machine "
        "(2 cores) for the row's own learning and its scoring on the validation split.", "",
    ]
    for n, s in summ.items():
        cols = list(s["means"])
        lines += [f"### {n} examples", "",
                  *markdown_table(["task", *cols, "job seconds"],
                                  [[r["task"], *[f"{r['rows'][c]['test']:.2f}" if c in r["rows"] else "–" for c in cols],
                                    f"{r['seconds']:.0f}"] for r in results if r["examples"] == n]
                                  + [["**mean**", *[f"**{s['means'][c]:.2f}**" for c in cols],
                                      f"{s['mean_job_seconds']:.0f}"]]), "",
                  "Seconds per row (mean over tasks): " + ", ".join(
                      f"{c} {sum(r['rows'][c]['seconds'] for r in results if r['examples'] == n and c in r['rows']) / s['tasks']:.0f} s"
                      for c in cols), ""]
    lines += ["### Goals", ""]
    goal_rows = []
    for n, s in summ.items():
        goal_rows.append([f"{n} examples: mean of the best learned row (goal ≥ {GOALS['mean_best_at_10']} at 10)",
                          f"{s['best_learned']:.2f}", "met" if s["best_learned"] >= GOALS["mean_best_at_10"] else "not met"])
        goal_rows.append([f"{n} examples: best learned − scratch, same examples and steps (goal ≥ {GOALS['over_scratch']})",
                          f"{s['over_scratch']:+.2f}", "met" if s["over_scratch"] >= GOALS["over_scratch"] else "not met"])
        goal_rows.append([f"{n} examples: the longest per-layer fusion (goal ≤ {GOALS['seconds']} s)",
                          f"{s['max_learn_seconds']:.0f} s", "met" if s["max_learn_seconds"] <= GOALS["seconds"] else "not met"])
    return lines + markdown_table(["goal", "measured", ""], goal_rows) + [""]


def headline(results: list[dict]) -> str:
    """The README's results row."""
    summ = summary(results)
    n = 10 if 10 in summ else max(summ)
    s = summ[n]
    return (f"| mixed tasks (two or three skills in one prompt), {n} examples, unseen prompts | best learned row "
            f"{s['best_learned']:.2f} mean over {s['tasks']} tasks (per layer {s['means'].get('learned per layer', 0):.2f}, "
            f"expanded {s['means'].get('expanded', 0):.2f}; per skill {s['means'].get('learned per skill', 0):.2f}, "
            f"context-aware {s['means'].get('context-aware', 0):.2f}, scratch {s['means'].get('scratch', 0):.2f}) "
            f"(goals ≥ 0.5, ≥ scratch + 0.2) |")


def write(results: list[dict], args) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "learn.json").write_text(json.dumps({"results": results, "summary": summary(results), "args": vars(args)},
                                                   indent=1))
    how = "`python -m bench.learn " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v) + "`"
    (REPORTS / "learn.md").write_text("\n".join(render(results, how) + ["![learned compositions](learn.png)", ""]))
    plot(results, REPORTS / "learn.png")


def run(tasks: list[str], sizes: list[int], test_n: int, full_start: bool, on_result=None) -> list[dict]:
    import torch

    torch.manual_seed(0)
    bench = Bench(test_n)
    results = []
    for n in sizes:
        for task in tasks:
            results.append({**bench.run(task, n, full_start), "test": test_n})
            if on_result:
                on_result(results)
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r["examples"] == max(x["examples"] for x in results if x["task"] == r["task"])]
    sizes = sorted({r["examples"] for r in results})
    fig, axes = plt.subplots(len(shown) + 1, 1, figsize=(10, 1.4 * len(shown) + 3.5), squeeze=False)
    for ax, r in zip(axes[1:, 0], shown):
        im = ax.imshow(r["layer_weights"]["table"], aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2)
        ax.set_yticks(range(len(r["skills"])), r["skills"], fontsize=7)
        ax.set_xticks(range(len(r["layer_weights"]["groups"])), r["layer_weights"]["groups"], fontsize=6)
        ax.set_title(f"{r['task']} ({r['examples']} examples): learned weight per layer", fontsize=8)
    fig.colorbar(im, ax=axes[1:, 0].tolist(), shrink=0.6)
    ax = axes[0, 0]
    for col in ROWS:
        ys = [sum(r["rows"][col]["test"] for r in results if r["examples"] == n and col in r["rows"]) /
              max(1, sum(1 for r in results if r["examples"] == n)) for n in sizes]
        ax.plot(sizes, ys, marker="o", label=col)
    ax.set_xlabel("examples")
    ax.set_ylabel("exact match, unseen prompts")
    ax.set_xticks(sizes)
    ax.legend(fontsize=6, ncol=4)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default=",".join(MIXED))
    parser.add_argument("--sizes", default="5,10,20")
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--full-start", action="store_true")
    parser.add_argument("--append", action="store_true", help="keep the results of learn.json for other tasks/sizes")
    args = parser.parse_args()
    kept = []
    if args.append and (REPORTS / "learn.json").exists():
        kept = json.loads((REPORTS / "learn.json").read_text())["results"]
    tasks, sizes = args.tasks.split(","), [int(x) for x in args.sizes.split(",")]
    kept = [r for r in kept if not (r["task"] in tasks and r["examples"] in sizes)]
    run(tasks, sizes, args.test, args.full_start,  # written after each task: a long run can be read early
        on_result=lambda results: write(kept + results, args))


if __name__ == "__main__":
    main()
