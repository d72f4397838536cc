"""Settling LoRA-LEGO's open details by measurement: centroid rule and output reweighting.

    python -m bench.lego_choice [--n 10]

For the three demo skills merged into one adapter (equal weights 1, the exact sum is rank 24),
at target ranks 8 and 16: reconstruction error against the exact sum (trace formula) and the
task effect (exact match of the merged adapter on each skill's held-out prompts, greedy,
transformers+PEFT), for svd (the Frobenius optimum) and each lego variant. Writes
bench/reports/lego_choice.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.compose import _exact_error
from bench.demo_data import exact_match, examples, trained_skills
from composer import compose
from lora.adapter import LoraAdapter
from server.core.base_model import prepare
from server.core.settings import get_settings
from server.jobs.training import greedy_answers

REPORTS = Path(__file__).resolve().parent / "reports"
VARIANTS = [("linear (exact)", "linear", {}), ("svd", "svd", {}), ("lego centroid=svd", "lego", {"centroid": "svd"}),
            ("lego centroid=mean", "lego", {"centroid": "mean"}),
            ("lego centroid=mean + output reweight", "lego", {"centroid": "mean", "output_reweight": True})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10, help="held-out prompts per skill")
    ap.add_argument("--average", action="store_true", help="weights 1/K (an average) instead of 1 (the sum)")
    args = ap.parse_args()
    base = prepare(get_settings())
    skills = trained_skills()
    adapters = [LoraAdapter.from_dir(Path(__file__).parent / "skills" / s) for s in skills]
    weights = [1.0 / len(adapters) if args.average else 1.0] * len(adapters)
    tests = {s: examples(s, "test", args.n, seed=3) for s in skills}
    rows = []
    for rank in (8, 16):
        for label, method, params in VARIANTS:
            if method == "linear" and rank == 16:
                continue
            merged, _ = compose(adapters, weights, method=method, params=params, rank=None if method == "linear" else rank)
            err = _exact_error(adapters, weights, merged)
            with tempfile.TemporaryDirectory() as tmp:
                merged.save_dir(tmp)
                scores = {s: sum(exact_match(o, a) for o, (_, a) in zip(greedy_answers(base, tmp, [p for p, _ in t], 48), t)) / len(t)
                          for s, t in tests.items()}
            rows.append({"rank": merged.rank, "variant": label, "error": err, **scores})
            print(rows[-1], flush=True)
    lines = ["# LoRA-LEGO choices, measured", "", f"Demo skills merged with equal weights {weights[0]:.3g}. Error: "
             "‖Σ ΔW_i − ΔŴ‖_F / ‖Σ ΔW_i‖_F. Exact match on held-out prompts of each skill (greedy, transformers+PEFT).", "",
             "| rank | variant | rel. error | " + " | ".join(skills) + " | mean |",
             "|---|---|---|" + "---|" * (len(skills) + 1)]
    for r in rows:
        mean = sum(r[s] for s in skills) / len(skills)
        lines.append(f"| {r['rank']} | {r['variant']} | {r['error']:.3f} | " + " | ".join(f"{r[s]:.2f}" for s in skills) + f" | {mean:.2f} |")
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / ("lego_choice_average.md" if args.average else "lego_choice.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
