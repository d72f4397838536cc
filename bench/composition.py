"""What a composition keeps of each skill it combines: fixed weights vs context-aware weights.

    python -m bench.composition [--quick] [--n N]

On the 8 demo skills, with held-out prompts (test templates, never training examples):

(a) every pair (28) composed per request: fixed weights 1/1 with linear, dare_ties and lego, against
    ``"weights": "auto"`` (α over the pair from the prompt, the shared weight rule) and two other
    α -> weight rules for the choice of rule (α summing to 1 as before; α/α_max with a coarser grid);
    retention per skill = exact match through the composition / exact match of the skill's own adapter;
(b) all 8 in one composition, the same ways;
(c) the extra latency of a context-aware request (choosing the weights; a cache miss adds the
    composition itself) and the cache hit rate over the benchmark's requests.

Answers are greedy, by transformers with the (composed) adapter merged into the base weights — the
reference engine; the serving tests check that vLLM gives the same tokens. Writes
bench/reports/composition.md, composition.json and composition.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.demo_data import MIXED, examples, mixed_examples, trained_skills
from bench.scoring import markdown_table, percentile, retention, score
from composer import Composition, compose, get_method
from lora.adapter import LoraAdapter
from router.weights import AlphaRule
from server.jobs.learned_weights import LossModel, OptimizeOptions, learn_weights, training_pairs

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "bench" / "skills"
REPORTS = ROOT / "bench" / "reports"
FIXED = ("linear", "dare_ties", "lego", "pcb", "layer_swap")
RULES: dict[str, AlphaRule | None] = {
    "auto (α/α_max, grid 0.25)": AlphaRule(grid=0.25, max_skills=3),  # the default
    "auto (α/α_max, grid 0.5)": AlphaRule(grid=0.5, max_skills=3),
    "auto (α summing to 1, grid 0.05)": None,  # the round-1 rule inside model="auto"
}
DEFAULT_RULE = "auto (α/α_max, grid 0.25)"
LEARNED = "learned (LoraHub, 5 examples per skill)"
LEARNED_MIXED = "learned (LoraHub, 5 examples of the task)"


def log(msg: str) -> None:
    print(f"[composition {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sum_to_one(alpha: Sequence[float], grid: float = 0.05) -> list[float]:
    """The round-1 rule: α renormalised to sum to 1 (rounded so prompts can share a composition)."""
    a = np.asarray(alpha, dtype=np.float64)
    a = a / a.sum()
    return [round(float(round(x / grid) * grid), 4) for x in a]


class Bench:
    def __init__(self, n: int, quick: bool) -> None:
        from bench.route import demo_profiles
        from router.psec import PsecRouter
        from server.core.base_model import prepare
        from server.core.settings import get_settings

        self.skills = trained_skills()
        self.n = n
        self.quick = quick
        self.tests = {s: examples(s, "test", n, seed=7) for s in self.skills}
        self.adapters = {s: LoraAdapter.from_dir(SKILLS / s) for s in self.skills}
        self.model = LossModel(prepare(get_settings()))
        self.generations = 0
        self.router, self.profiles = PsecRouter(get_settings().router_config()), demo_profiles()
        self.own_answers: dict[str, list[str]] = {}
        self.route_ms: list[float] = []
        self.compose_ms: list[float] = []
        self.requests = 0
        self.materialisations: set[tuple] = set()
        self.alone = 0
        self.learned_log: list[dict] = []

    def answers(self, adapter: LoraAdapter | None, prompts: Sequence[str]) -> list[str]:
        self.generations += len(prompts)
        return self.model.answers(adapter, prompts)

    def own(self) -> dict[str, float]:
        out = {}
        for s in self.skills:
            self.own_answers[s] = self.answers(self.adapters[s], [p for p, _ in self.tests[s]])
            out[s] = score(self.own_answers[s], [a for _, a in self.tests[s]])
        return out

    def _compose(self, skills: Sequence[str], weights: Sequence[float], method: str, timed: bool = False) -> LoraAdapter:
        t0 = time.perf_counter()
        adapter, _ = compose([self.adapters[s] for s in skills], list(weights), method=method)
        if timed:
            self.compose_ms.append((time.perf_counter() - t0) * 1000)
        return adapter

    def fixed(self, skills: Sequence[str], method: str) -> dict[str, float]:
        """Every skill at weight 1, one adapter for all prompts."""
        adapter = self._compose(skills, [1.0] * len(skills), method)
        prompts = [p for s in skills for p, _ in self.tests[s]]
        outs = self.answers(adapter, prompts)
        return {s: score(outs[i * self.n:(i + 1) * self.n], [a for _, a in self.tests[s]]) for i, s in enumerate(skills)}

    def learn(self, skills: Sequence[str], pairs: Sequence[tuple[str, str]] | None = None, budget: int = 40) -> list[float]:
        """LoraHub's weights for ``skills`` (linear) from ``pairs``, or from each skill's registered example
        prompts (5 each) with the skill's own greedy answers as targets."""
        options = OptimizeOptions(budget=budget)
        if pairs is None:
            examples = {p.name: p.examples for p in self.profiles}
            pairs, _ = training_pairs(options, [(s, self.adapters[s], examples[s]) for s in skills], self.model, lambda p: 0)
        comp = Composition(skills=tuple(skills), method="linear")
        result = learn_weights(comp, [self.adapters[s] for s in skills], pairs, options, self.model, max_rank=4096)
        self.learned_log.append({"skills": list(skills), "weights": result.weights, "initial": result.initial.objective,
                                 "best": result.best.objective, "seconds": result.seconds})
        return result.weights

    def learned(self, skills: Sequence[str]) -> dict[str, float]:
        w = self.learn(skills)
        adapter = self._compose(skills, w, "linear")
        prompts = [p for s in skills for p, _ in self.tests[s]]
        outs = self.answers(adapter, prompts)
        return {s: score(outs[i * self.n:(i + 1) * self.n], [a for _, a in self.tests[s]]) for i, s in enumerate(skills)}

    def context_aware(self, skills: Sequence[str], rule_name: str, method: str = "linear") -> dict[str, float]:
        """Per prompt: α over ``skills`` from the router, weights by the rule; prompts that get the same
        weights share one composition (as the server's cache does); a dominant skill alone is its own adapter."""
        rule = RULES[rule_name]
        template = Composition(skills=tuple(skills), weights="auto", method=method)
        groups: dict[tuple[float, ...], list[tuple[str, int]]] = {}
        for s in skills:
            for i, (p, _) in enumerate(self.tests[s]):
                t0 = time.perf_counter()
                plan = self.router.route_within(p, template, self.profiles, 0)
                self.route_ms.append((time.perf_counter() - t0) * 1000)
                w = tuple(plan.composition.weights) if rule is not None else tuple(sum_to_one(plan.alpha))
                if rule is not None and rule != self.router.config.rule:
                    from router.weights import weights_from_alpha

                    w = tuple(weights_from_alpha(plan.alpha, rule))
                groups.setdefault(w, []).append((s, i))
                if rule_name == DEFAULT_RULE:
                    self.requests += 1
                    if sum(x > 0 for x in w) == 1:
                        self.alone += 1
                    else:
                        self.materialisations.add((tuple(skills), w))
        outs: dict[tuple[str, int], str] = {}
        for w, members in groups.items():
            active = [(s, x) for s, x in zip(skills, w) if x]
            if len(active) == 1 and active[0][1] == 1.0:  # served alone: its own adapter, its own answers
                for s, i in members:
                    outs[(s, i)] = self.own_answers[s][i] if s == active[0][0] else None
                missing = [(s, i) for s, i in members if outs[(s, i)] is None]
                adapter = self.adapters[active[0][0]]
            else:
                missing = members
                adapter = self._compose([s for s, _ in active], [x for _, x in active], method, timed=True)
            if missing:
                for key, o in zip(missing, self.answers(adapter, [self.tests[s][i][0] for s, i in missing])):
                    outs[key] = o
        return {s: score([outs[(s, i)] for i in range(self.n)], [a for _, a in self.tests[s]]) for s in skills}


def capped(scores: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    """Retention per skill, at most 1 (a composition cannot keep more than all of a skill; above 1 is noise
    on a skill whose own adapter misses some of these prompts)."""
    return {k: min(1.0, v) for k, v in retention(scores, own).items()}


def run(n: int, quick: bool) -> dict:
    b = Bench(n, quick)
    t0 = time.time()
    own = b.own()
    log(f"own adapters in {time.time() - t0:.0f} s: {own}")
    pairs = list(itertools.combinations(b.skills, 2))
    if quick:
        pairs = pairs[::14]
    # the search costs ~80 s a pair on 2 CPU cores: learned weights on every third pair (all of them when quick)
    learned_pairs = set(pairs if quick else pairs[::3])
    configs: list[tuple[str, Callable[[Sequence[str]], dict[str, float]]]] = [
        (f"fixed 1/1 {m}", lambda sk, m=m: b.fixed(sk, m)) for m in FIXED
    ] + [(r, lambda sk, r=r: b.context_aware(sk, r)) for r in RULES] + [(LEARNED, b.learned)]
    pair_rows = []
    for a, c in pairs:
        row = {"pair": [a, c]}
        for label, fn in configs:
            if label == LEARNED and (a, c) not in learned_pairs:
                continue
            scores = fn((a, c))
            row[label] = {"scores": scores, "retention": capped(scores, own)}
        pair_rows.append(row)
        log(f"pair {a}+{c} in {time.time() - t0:.0f} s: " + ", ".join(
            f"{label}: {statistics.mean(row[label]['retention'].values()):.2f}" for label, _ in configs
            if label in row and row[label]['retention']))
    summary = {}
    for label, _ in configs:
        rows = [r for r in pair_rows if label in r and r[label]["retention"]]
        per_pair = [statistics.mean(r[label]["retention"].values()) for r in rows]
        summary[label] = {"mean": statistics.mean(per_pair), "min": min(per_pair), "pairs": len(rows),
                          "pairs_losing_a_skill": sum(min(r[label]["retention"].values()) == 0 for r in rows)}
        # the same pairs, for comparing with the learned weights on equal terms
        learned_rows = [r for r in rows if LEARNED in r]
        summary[label]["mean_on_learned_pairs"] = statistics.mean(
            statistics.mean(r[label]["retention"].values()) for r in learned_rows) if learned_rows else float("nan")
    all8 = {}
    for label, fn in configs:
        if label == "fixed 1/1 layer_swap":  # two skills at most
            all8[label] = {"scores": {}, "retention": {}, "mean": float("nan")}
            continue
        scores = fn(b.skills)
        ret = capped(scores, own)
        all8[label] = {"scores": scores, "retention": ret, "mean": statistics.mean(ret.values())}
        log(f"all 8 {label}: {all8[label]['mean']:.2f} in {time.time() - t0:.0f} s")
    mixed_n = 4 if quick else 10
    mixed = mixed_tasks(b, mixed_n)
    log(f"mixed tasks in {time.time() - t0:.0f} s")
    composed = b.requests - b.alone
    latency = {
        "route_within_ms_p50": percentile(b.route_ms, 50), "route_within_ms_p95": percentile(b.route_ms, 95),
        "compose_ms_p50": percentile(b.compose_ms, 50), "compose_ms_p95": percentile(b.compose_ms, 95),
        "requests": b.requests, "served_alone": b.alone, "distinct_compositions": len(b.materialisations),
        "cache_hit_rate": (b.requests - len(b.materialisations)) / b.requests if b.requests else float("nan"),
        "composition_cache_hit_rate": (composed - len(b.materialisations)) / composed if composed else float("nan"),
    }
    return {"skills": b.skills, "prompts_per_skill": n, "own": own, "pairs": pair_rows, "summary": summary, "all8": all8,
            "mixed": mixed, "mixed_prompts": mixed_n, "learned": b.learned_log, "latency": latency, "seconds": time.time() - t0,
            "generations": b.generations, "quick": quick}


def mixed_tasks(b: Bench, n: int) -> dict:
    """Prompts that need two or three skills at once: each skill alone, fixed merges (NaN for a method that takes
    fewer skills), auto, and weights learned from 5 examples of the task (train templates; scored on test templates)."""
    out = {}
    for task, spec in MIXED.items():
        needed = spec["skills"]  # two or three skills
        tests = mixed_examples(task, "test", n, seed=3)
        prompts, answers = [p for p, _ in tests], [a for _, a in tests]
        row: dict[str, float] = {}
        for s in needed:
            row[f"{s} alone"] = score(b.answers(b.adapters[s], prompts), answers)
        for m in FIXED:
            cap = get_method(m).max_inputs
            if cap is not None and len(needed) > cap:  # layer_swap: two skills at most
                row[f"fixed 1/1 {m}"] = float("nan")
                continue
            row[f"fixed 1/1 {m}"] = score(b.answers(b._compose(needed, [1.0] * len(needed), m), prompts), answers)
        template = Composition(skills=needed, weights="auto")
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(b.router.route_within(p, template, b.profiles, 0).composition.weights), []).append(i)
        auto_out = [""] * n
        for w, idx in groups.items():
            active = [(s, x) for s, x in zip(needed, w) if x]
            adapter = b._compose([s for s, _ in active], [x for _, x in active], "linear")
            for i, o in zip(idx, b.answers(adapter, [prompts[i] for i in idx])):
                auto_out[i] = o
        row[DEFAULT_RULE] = score(auto_out, answers)
        w = b.learn(needed, mixed_examples(task, "train", 5, seed=1))
        row[LEARNED_MIXED] = score(b.answers(b._compose(needed, w, "linear"), prompts), answers)
        row["learned weights"] = w
        out[task] = {"skills": list(needed), "scores": row}
        log(f"mixed {task}: {row}")
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(res["summary"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(x - 0.2, [res["summary"][k]["mean"] for k in labels], 0.4, label=f"pairs (mean of {len(res['pairs'])})")
    ax.bar(x + 0.2, [res["all8"][k]["mean"] for k in labels], 0.4, label="all 8 skills")
    ax.axhline(0.95, color="grey", ls="--", lw=0.8)
    ax.set_xticks(x, [k.replace(" (", "\n(") for k in labels], fontsize=7)
    ax.set_ylabel("mean retention (exact match / own adapter's)")
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.set_title("What a composition keeps of each skill: fixed, context-aware and learned weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(res: dict) -> str:
    s, lat = res["summary"], res["latency"]
    rows = [[k, v["pairs"], v["mean"], v["min"], v["pairs_losing_a_skill"], v["mean_on_learned_pairs"], res["all8"][k]["mean"]]
            for k, v in s.items()]
    mixed = res["mixed"]
    mixed_cols = [k for k in next(iter(mixed.values()))["scores"] if k != "learned weights" and not k.endswith(" alone")]
    mixed_rows = [[t, " + ".join(m["skills"]), max(v for k, v in m["scores"].items() if k.endswith(" alone")),
                   *[m["scores"][c] for c in mixed_cols], ", ".join(f"{w:.2f}" for w in m["scores"]["learned weights"])]
                  for t, m in mixed.items()]
    pairs_n = len(res["pairs"])
    lines = [
        "# Composition retention: fixed, context-aware and learned weights", "",
        f"Generated by `python -m bench.composition{' --quick' if res['quick'] else ''}` in {res['seconds'] / 60:.0f} min "
        f"({res['generations']} greedy answers, transformers on 2 CPU cores). {res['prompts_per_skill']} held-out prompts "
        "per skill (test templates, never the skills' examples). Retention of a skill = its exact match through the "
        "composition / its own adapter's exact match, at most 1; a pair's retention is the mean of its two skills'.", "",
        "![retention](composition.png)", "",
        f"## Pairs ({pairs_n}) and all 8 skills in one composition", "",
        *markdown_table(["configuration", "pairs", "pairs: mean retention", "pairs: worst pair", "pairs losing a skill (0 %)",
                         f"mean on the {s[LEARNED]['pairs']} pairs with learned weights", "all 8: mean retention"], rows), "",
        "- *fixed 1/1 M*: every skill at weight 1, merged by method M once for every prompt (`layer_swap`: layers 8–21 "
        "from the second skill, the rest from the first; two skills at most).",
        "- *auto (…)*: `\"weights\": \"auto\"` — per prompt, the router's α restricted to the composition's skills; "
        "the rule in brackets turns α into weights. `α/α_max, grid 0.25` is Mosaic's default (router/weights.py): "
        "the strongest skill at full strength, the others α_i/α_max rounded to 0.25, a skill under 0.125 left out "
        "(so a dominant skill is served alone, exactly). `α summing to 1` was round 1's rule inside `model=\"auto\"`.",
        "- *learned*: `\"optimize\"` — LoraHub's search (nevergrad NGOpt, 40 loss evaluations, L1 0.05, weights in "
        "[-1.5, 1.5], start at 0) on each skill's 5 registered example prompts with the skill's own greedy answers as "
        "targets; one static composition (linear, exact) for every prompt.",
        "", "## Mixed tasks: prompts that need two or three skills at once", "",
        f"Exact match on {res['mixed_prompts']} "
        "held-out prompts per task (test templates); learned weights from 5 examples of the task (train templates).", "",
        *markdown_table(["task", "skills", "best skill alone", *mixed_cols, "learned weights"], mixed_rows), "",
        "## Latency and cache (context-aware requests, default rule)", "",
        *markdown_table(["measure", "value"], [
            ["choosing the weights (encode + α), p50 / p95", f"{lat['route_within_ms_p50']:.1f} / {lat['route_within_ms_p95']:.1f} ms"],
            ["composing on a cache miss (linear, exact), p50 / p95", f"{lat['compose_ms_p50']:.0f} / {lat['compose_ms_p95']:.0f} ms"],
            ["context-aware requests in this benchmark", lat["requests"]],
            ["served by one skill alone (its own adapter, no composition)", lat["served_alone"]],
            ["distinct compositions the others needed", lat["distinct_compositions"]],
            ["hit rate over all context-aware requests", f"{lat['cache_hit_rate']:.1%}"],
            ["hit rate over those needing a composition", f"{lat['composition_cache_hit_rate']:.1%}"],
        ]), "",
        "A context-aware request pays the weight choice every time; a miss also pays the composition (and the engine "
        "loading a new adapter), a hit nothing more than a named skill.",
        "", "## Per pair", "",
        *markdown_table(["pair", *s], [[" + ".join(r["pair"]), *[statistics.mean(r[k]["retention"].values())
                                                              if k in r and r[k]["retention"] else "-" for k in s]]
                                       for r in res["pairs"]]),
        "", "## Own adapters (exact match on these prompts)", "",
        *markdown_table(["skill", "exact match"], [[k, v] for k, v in res["own"].items()]),
        "", "## Learned weights (objective = loss + 0.05·Σ|w|: at the start → best)", "",
        *markdown_table(["skills", "weights", "objective", "seconds"], [
            [" + ".join(x["skills"]) if len(x["skills"]) < 8 else "all 8", ", ".join(f"{w:.2f}" for w in x["weights"]),
             f"{x['initial']:.3f} → {x['best']:.3f}", f"{x['seconds']:.0f}"] for x in res["learned"]]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 of the 28 pairs, 3 prompts per skill")
    ap.add_argument("--n", type=int, default=None, help="held-out prompts per skill (default 6; quick 3)")
    args = ap.parse_args()
    n = args.n or (3 if args.quick else 6)
    res = run(n, args.quick)
    write(res)
    print(render(res))


def write(res: dict) -> None:
    """composition[_quick].json, .md and .png under bench/reports."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if res["quick"] else ""
    (REPORTS / f"composition{suffix}.json").write_text(json.dumps(res, indent=2, default=float))
    plot(res, REPORTS / f"composition{suffix}.png")
    (REPORTS / f"composition{suffix}.md").write_text(render(res).replace("composition.png", f"composition{suffix}.png"))


def headline(res: dict) -> list[str]:
    """Rows for the README's Results table."""
    s, a8, fixed = res["summary"], res["all8"], [k for k in res["summary"] if k.startswith("fixed")]
    best_fixed = max(fixed, key=lambda k: s[k]["mean"])
    mixed = res["mixed"]
    learned_mixed = sum(m["scores"][LEARNED_MIXED] for m in mixed.values()) / len(mixed)
    return [
        f"| two-skill composition, mean retention of both skills ({len(res['pairs'])} pairs) | context-aware "
        f"{s[DEFAULT_RULE]['mean']:.2f} vs fixed 1/1 {s[best_fixed]['mean']:.2f} (best fixed, {best_fixed.split()[-1]}); "
        f"learned {s[LEARNED]['mean']:.2f} vs best fixed {s[best_fixed]['mean_on_learned_pairs']:.2f} on the "
        f"{s[LEARNED]['pairs']} pairs searched (goals: context-aware ≥ 0.95, learned ≥ fixed + 0.15) |",
        f"| all 8 skills in one composition, mean retention | context-aware {a8[DEFAULT_RULE]['mean']:.2f} vs fixed "
        f"{max(a8[k]['mean'] for k in fixed if a8[k]['scores']):.2f} vs learned {a8[LEARNED]['mean']:.2f} (goal ≥ 0.9 context-aware) |",
        f"| mixed tasks (two or three skills in one prompt), exact match with learned weights | {learned_mixed:.2f} "
        f"mean over {len(mixed)} tasks (goal ≥ 0.5) |",
    ]


if __name__ == "__main__":
    main()
