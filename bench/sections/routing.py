"""Section 2, routing: the router's accuracy on held-out paraphrases, out-of-distribution prompts and
two-skill prompts, with the confusion matrix (bench/route.py's measurement)."""

from __future__ import annotations

import argparse

from bench.demo_data import examples, trained_skills
from bench.scoring import markdown_table


def run(args: argparse.Namespace) -> dict:
    from bench.route import accuracy, demo_profiles, latency
    from router.psec import PsecRouter
    from server.core.settings import get_settings

    config = get_settings().router_config()
    router = PsecRouter(config)
    profiles = demo_profiles()
    acc = accuracy(router, profiles, 10 if args.quick else 40)
    prompts = [p for s in trained_skills() for p, _ in examples(s, "test", 3, seed=1)]
    acc["latency"] = latency(router, profiles, prompts, 2 if args.quick else 5)
    acc["thresholds"] = {"ood": config.ood, "mix_similarity": config.mix_similarity, "mix_min": config.mix_min,
                         "max_skills": config.rule.max_skills}
    return acc


def render(r: dict, quick: bool) -> tuple[list[str], list[str]]:
    L = ["## 2. Routing", "", f"Thresholds {r['thresholds']}. Decision latency p50 {r['latency']['p50_ms']:.1f} ms, "
         f"p95 {r['latency']['p95_ms']:.1f} ms (MiniLM on the CPU).", "",
         *markdown_table(["measure", "value"], [
             ["held-out paraphrases routed to their skill", f"{r['in_distribution']:.1%} of {r['n']}"],
             ["out-of-distribution prompts routed to base", f"{r['ood_to_base']:.1%} of {r['n_ood']}"],
             ["two-skill prompts composed from exactly their skills",
              f"{sum(m['ok'] for m in r['multi'])} of {len(r['multi'])}"]]),
         "", "Confusion (rows: truth, columns: decision):", ""]
    cols = list(next(iter(r["confusion"].values())))
    L += markdown_table(["", *cols], [[t, *[row[c] for c in cols]] for t, row in r["confusion"].items()])
    L += ["", "Two-skill prompts:", ""] + [f"- {m['kind']} {m['skills']} (expected {m['expected']}): "
                                          f"{'ok' if m['ok'] else 'MISS'}" for m in r["multi"]] + [""]
    headline = [f"| routing accuracy | {r['in_distribution']:.1%} held-out in-distribution, {r['ood_to_base']:.1%} "
                f"out-of-distribution to base, {sum(m['ok'] for m in r['multi'])}/{len(r['multi'])} two-skill |"]
    return L, headline
