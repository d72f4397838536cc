"""Section 7, composition: what a composition keeps of each skill: every pair and all 8, fixed weights vs
context-aware ("weights": "auto") vs learned (LoraHub); mixed tasks that need two skills at once
(bench/composition.py, which also writes composition[_quick].{json,md,png})."""

from __future__ import annotations

import argparse

from bench.sections import suffix


def run(args: argparse.Namespace) -> dict:
    from bench import composition

    res = composition.run(3 if args.quick else 6, args.quick)
    composition.write(res)
    return res


def render(co: dict, quick: bool) -> tuple[list[str], list[str]]:
    from bench import composition

    body = composition.render(co).replace("composition.png", f"composition{suffix(quick)}.png")
    body = body.replace("# Composition retention", "## 7. Composition retention", 1).replace("\n## ", "\n### ")
    return [body.replace("### 7. Composition", "## 7. Composition"), ""], composition.headline(co)
