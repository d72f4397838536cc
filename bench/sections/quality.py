"""Section 1, quality: exact match per demo skill for the base model, the skill's own adapter, auto (the
router), and every composition method merging all skills into one adapter at two target ranks, next to
PEFT's own add_weighted_adapter variants; retention = merged score / own score. Greedy, transformers+PEFT
(the reference engine; the same adapters serve identically through vLLM, tested)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.demo_data import examples, trained_skills
from bench.scoring import markdown_table, mean_retention, score
from bench.sections import SKILLS, log, suffix


def _answers(base: Path, adapter, prompts: list[str], batch: int = 16) -> list[str]:
    """Greedy answers with ``adapter`` (a LoraAdapter, a folder, or None for the base model)."""
    from lora.adapter import LoraAdapter
    from server.jobs.training import greedy_answers

    if isinstance(adapter, LoraAdapter):
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_dir(tmp)
            return greedy_answers(base, tmp, prompts, 48, batch_size=batch)
    return greedy_answers(base, adapter, prompts, 48, batch_size=batch)


def _peft_merge(skills: list[str], combination: str, rank: int | None, density: float, weight: float) -> Path:
    """PEFT's own add_weighted_adapter over all the skills (one weight each), saved as a PEFT folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.core.base_model import prepare
    from server.core.settings import get_settings

    model = AutoModelForCausalLM.from_pretrained(prepare(get_settings()), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(SKILLS / skills[0]), adapter_name=skills[0])
    for s in skills[1:]:
        model.load_adapter(str(SKILLS / s), adapter_name=s)
    kw = {"svd_rank": rank} if "svd" in combination else {}
    if combination not in ("cat", "svd"):
        kw["density"] = density
    model.add_weighted_adapter(skills, [weight] * len(skills), "merged", combination_type=combination, **kw)
    out = Path(tempfile.mkdtemp(prefix="peft-merge-"))
    model.save_pretrained(str(out), selected_adapters=["merged"])
    return out / "merged"


def run(args: argparse.Namespace) -> dict:
    from bench.route import demo_profiles
    from composer import compose
    from composer.registry import METHODS
    from lora.adapter import LoraAdapter
    from router.psec import PsecRouter
    from server.core.base_model import prepare
    from server.core.settings import get_settings

    quick = args.quick
    base = prepare(get_settings())
    skills = trained_skills()
    n = 4 if quick else 8
    tests = {s: examples(s, "test", n, seed=5) for s in skills}
    prompts = [p for s in skills for p, _ in tests[s]]

    def per_skill(outputs: list[str]) -> dict[str, float]:
        out, i = {}, 0
        for s in skills:
            out[s] = score(outputs[i:i + n], [a for _, a in tests[s]])
            i += n
        return out

    adapters = {s: LoraAdapter.from_dir(SKILLS / s) for s in skills}
    rows: list[dict] = []
    t0 = time.time()
    rows.append({"config": "base model", "rank": None, "scores": per_skill(_answers(base, None, prompts))})
    own = {s: score(_answers(base, SKILLS / s, [p for p, _ in tests[s]]), [a for _, a in tests[s]]) for s in skills}
    rows.append({"config": "own adapter", "rank": 8, "scores": own})
    log(f"quality: base and own adapters in {time.time() - t0:.0f} s")

    # auto: the router's plan for each prompt, served with that plan's adapter
    router, profiles = PsecRouter(get_settings().router_config()), demo_profiles()
    groups: dict[tuple, list[int]] = {}
    plans = {}
    for i, p in enumerate(prompts):
        plan = router.route(p, profiles, 0)
        key = (plan.kind, plan.skill) if plan.kind != "composition" else (
            "composition", plan.composition.content_key(list(plan.composition.skills)))
        plans[key] = plan
        groups.setdefault(key, []).append(i)
    auto_out = [""] * len(prompts)
    for key, idx in groups.items():
        plan = plans[key]
        if plan.kind == "base":
            adapter = None
        elif plan.kind == "skill":
            adapter = SKILLS / plan.skill
        else:
            adapter = compose([adapters[s] for s in plan.composition.skills], **plan.composition.compose_kwargs())[0]
        for i, o in zip(idx, _answers(base, adapter, [prompts[i] for i in idx])):
            auto_out[i] = o
    rows.append({"config": "auto (router)", "rank": None, "scores": per_skill(auto_out)})
    log(f"quality: auto in {time.time() - t0:.0f} s ({len(groups)} distinct plans)")

    ranks = (8,) if quick else (8, 32)
    methods = ["linear", "svd", "ties", "lego"] if quick else sorted(METHODS)
    all_adapters = [adapters[s] for s in skills]
    # one weight λ for every skill in every merge, chosen on the *baseline*: the exact sum's best λ on
    # pilot prompts (another seed than the scored ones), so any tuning favours linear, not lego
    pilot = {s: examples(s, "test", 4, seed=99) for s in skills}
    pilot_prompts = [p for s in skills for p, _ in pilot[s]]
    pilot_answers = [a for s in skills for _, a in pilot[s]]
    lambdas = {}
    for lam in (1.0, 0.5, 0.25, 1.0 / len(skills)):
        exact_lam, _ = compose(all_adapters, [lam] * len(skills), method="linear")
        lambdas[round(lam, 4)] = score(_answers(base, exact_lam, pilot_prompts), pilot_answers)
    lam = max(lambdas, key=lambda k: (lambdas[k], k))
    log(f"quality: λ pilot {lambdas} -> {lam} in {time.time() - t0:.0f} s")
    for rank in ranks:
        for method in methods:
            merged, rep = compose(all_adapters, [lam] * len(skills), method=method, rank=rank)
            rows.append({"config": f"mosaic {method}", "rank": merged.rank, "method": method, "engine": "mosaic",
                         "relative_error": rep.relative_error, "scores": per_skill(_answers(base, merged, prompts))})
            log(f"quality: mosaic {method} rank {rank} in {time.time() - t0:.0f} s")
    # linear without a target rank: the exact sum (rank 8·K), PEFT's 'cat' is the same adapter
    exact, _ = compose(all_adapters, [lam] * len(skills), method="linear")
    rows.append({"config": "mosaic linear (exact)", "rank": exact.rank, "method": "linear", "engine": "mosaic",
                 "scores": per_skill(_answers(base, exact, prompts))})
    peft_variants = [("cat", None)] + [(c, r) for r in ranks for c in (["svd", "ties_svd"] if quick else
                                                                      ["svd", "ties_svd", "dare_ties_svd", "magnitude_prune_svd"])]
    for combination, rank in peft_variants:
        folder = _peft_merge(skills, combination, rank, density=0.5, weight=lam)
        rows.append({"config": f"peft {combination}", "rank": rank or 8 * len(skills), "method": combination, "engine": "peft",
                     "scores": per_skill(_answers(base, folder, prompts))})
        log(f"quality: peft {combination} rank {rank} in {time.time() - t0:.0f} s")
    for r in rows:
        r["mean"] = statistics.mean(r["scores"].values())
        r["mean_retention"] = mean_retention(r["scores"], own)
    return {"skills": skills, "prompts_per_skill": n, "ranks": list(ranks), "rows": rows, "seconds": time.time() - t0,
            "weight": lam, "weight_pilot": lambdas}


def render(q: dict, quick: bool) -> tuple[list[str], list[str]]:
    best = max((r for r in q["rows"] if "engine" in r), key=lambda r: r["mean_retention"])
    lego = [r for r in q["rows"] if r.get("method") == "lego"]
    others = [r for r in q["rows"] if "engine" in r and r.get("method") != "lego"]
    lego_best = max(r["mean_retention"] for r in lego) if lego else float("nan")
    others_best = max(others, key=lambda r: r["mean_retention"])
    auto = next(r for r in q["rows"] if r["config"] == "auto (router)")
    L = ["## 1. Quality: all skills in one adapter", "",
         f"{len(q['skills'])} demo skills, {q['prompts_per_skill']} held-out prompts each (test templates never "
         "trained on), greedy exact match through transformers+PEFT. Every merge uses the same weight λ = "
         f"{q['weight']:.3g} per skill — the best λ for the exact sum (`linear`) on pilot prompts of another seed "
         f"(pilot exact match by λ: {q['weight_pilot']}) — and each method's default parameters (density 0.5 for "
         "PEFT's pruning variants). Retention = merged score / the skill's own adapter score, averaged over skills.", "",
         f"![quality](quality{suffix(quick)}.png)", ""]
    header = ["config", "rank", *q["skills"], "mean EM", "mean retention"]
    L += markdown_table(header, [[r["config"], r["rank"] if r["rank"] is not None else "–",
                                  *[f"{r['scores'][s]:.2f}" for s in q["skills"]], f"{r['mean']:.3f}",
                                  f"{r['mean_retention']:.3f}"] for r in q["rows"]])
    verdict = "beats" if lego_best > others_best["mean_retention"] else "does not beat"
    L += ["", f"**Headline:** `lego`'s best mean retention {lego_best:.3f} {verdict} the best other merge "
          f"({others_best['config']} r={others_best['rank']}: {others_best['mean_retention']:.3f}); best overall: "
          f"{best['config']} r={best['rank']} ({best['mean_retention']:.3f}). Routing instead of merging (`auto`) "
          f"retains {auto['mean_retention']:.3f}.", ""]
    headline = [f"| quality: mean retention, all {len(q['skills'])} skills merged | lego best {lego_best:.2f}; "
                f"best merge {best['config']} r={best['rank']} {best['mean_retention']:.2f}; "
                f"auto {auto['mean_retention']:.2f} |"]
    return L, headline


def plot(q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in q["rows"] if "engine" in r]
    labels = [f"{r['config']}\nr={r['rank']}" for r in rows]
    colors = ["tab:blue" if r["engine"] == "mosaic" else "tab:orange" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.55), 4.5))
    ax.bar(range(len(rows)), [r["mean_retention"] for r in rows], color=colors)
    auto = next(r for r in q["rows"] if r["config"] == "auto (router)")
    ax.axhline(auto["mean_retention"], color="tab:green", ls="--", label=f"auto (router): {auto['mean_retention']:.2f}")
    ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("mean retention (merged / own exact match)")
    ax.set_title(f"All {len(q['skills'])} demo skills merged into one adapter (blue: Mosaic, orange: PEFT)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
