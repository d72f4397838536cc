"""Section 11, learn: compositions learned from a few examples of mixed tasks (two or three skills in one
answer): every row of the learning job's report (each skill alone, best fixed merge, context-aware, fusion per
skill and per layer, expanded, a LoRA from scratch with the same examples and steps) scored on unseen prompts
(bench/learn.py, which also writes learn.{json,md,png} when run alone)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> dict:
    from bench import learn
    from bench.demo_data import MIXED

    tasks = ["reverse_upper", "french_upper"] if args.quick else list(MIXED)
    sizes = [5] if args.quick else [5, 10, 20]
    return {"results": learn.run(tasks, sizes, 10 if args.quick else 20, False)}


def render(res: dict, quick: bool) -> tuple[list[str], list[str]]:
    from bench import learn

    how = res.get("how", f"`python -m bench.run{' --quick' if quick else ''}`")
    lines = learn.render(res["results"], how, title="## 11. Learned compositions on mixed tasks")
    return [*lines, "![learned compositions](learn.png)", ""], [learn.headline(res["results"])]


def plot(res: dict, path: Path) -> None:
    from bench import learn

    learn.plot(res["results"], path)
