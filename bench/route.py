"""Router benchmark: decision latency, retraining time, routing accuracy, and auto vs own name.

    python -m bench.route [--quick] [--no-serve]

1. Latency of one decision (encode + α + rule) with 10 and 100 registered skills (the demo
   skills plus synthetic profiles), p50/p95 over repeated prompts; retraining time at 100
   skills, with the example embeddings cold (first time) and cached (a library change).
2. Routing accuracy: held-out paraphrases of the demo skills (test templates, never examples)
   -> their skill; out-of-distribution prompts -> base; two-skill prompts -> a composition
   of exactly those two. Confusion matrix.
3. End to end through a real server (vLLM): exact match through model="auto" vs model=<skill>.

Writes bench/reports/route.md and route.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from adapter_store.skill_info import SkillInfo
from bench.demo_data import exact_match, examples, trained_skills
from bench.route_prompts import MULTI, OOD
from router.psec import PsecRouter
from server.core.settings import get_settings

T = get_settings().router_config()  # the thresholds the server uses

REPORTS = Path(__file__).resolve().parent / "reports"
TOPICS = ["astronomy", "cooking", "tax law", "gardening", "chess", "python errors", "medieval history", "knitting",
          "car repair", "poetry meter", "birdwatching", "stock options", "yoga", "jazz chords", "sql joins", "pottery",
          "volcanoes", "wine pairing", "cryptography", "sailing", "origami", "dog training", "linear algebra", "tea",
          "photography", "beekeeping"]
VERBS = ["Explain", "Summarise", "Answer questions about", "Give tips on", "Quiz me on", "Correct mistakes in",
         "Write haiku about", "Translate jargon of"]


def demo_profiles() -> list[SkillInfo]:
    out = []
    for d in sorted((Path(__file__).parent / "skills").iterdir()):
        m = json.loads((d / "mosaic.json").read_text())
        out.append(SkillInfo(name=d.name, version=1, sha256=d.name, rank=8, target_modules=[], description=m["description"],
                             examples=m["examples"]))
    return out


def synthetic_profiles(n: int, seed: int = 0) -> list[SkillInfo]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic, verb = TOPICS[i % len(TOPICS)], VERBS[(i // len(TOPICS)) % len(VERBS)]
        ex = [f"{verb} {topic}: {rng.choice(['a beginner question', 'a tricky case', 'the basics', 'an example'])} #{j}"
              for j in range(6)]
        out.append(SkillInfo(name=f"synthetic-{i:03d}", version=1, sha256=f"s{i}", rank=8, target_modules=[],
                             description=f"{verb} {topic}.", examples=ex))
    return out


def latency(router: PsecRouter, skills: list[SkillInfo], prompts: list[str], reps: int) -> dict:
    router.route(prompts[0], skills, 0)  # trains (or loads) once
    times = []
    for _ in range(reps):
        for p in prompts:
            t = time.perf_counter()
            router.route(p, skills, 0)
            times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)), "n": len(times)}


def accuracy(router: PsecRouter, skills: list[SkillInfo], n: int) -> dict:
    names = [s.name for s in skills]
    labels = names + ["base", "composition"]
    confusion = {t: {p: 0 for p in labels} for t in names + ["base"]}
    correct = total = 0
    for s in names:
        for p, _ in examples(s, "test", n, seed=42):
            plan = router.route(p, skills, 0)
            got = plan.skill if plan.kind == "skill" else plan.kind
            confusion[s][got] += 1
            correct += got == s
            total += 1
    ood_ok = 0
    for p in OOD:
        plan = router.route(p, skills, 0)
        got = plan.skill if plan.kind == "skill" else plan.kind
        confusion["base"][got] += 1
        ood_ok += plan.kind == "base"
    multi = []
    for p, expected in MULTI:
        plan = router.route(p, skills, 0)
        multi.append({"prompt": p, "expected": sorted(expected), "kind": plan.kind, "skills": plan.skills,
                      "weights": list(plan.composition.weights) if plan.composition else [],
                      "ok": plan.kind == "composition" and set(plan.skills) == expected})
    return {"in_distribution": correct / total, "n": total, "ood_to_base": ood_ok / len(OOD), "n_ood": len(OOD),
            "multi": multi, "confusion": confusion}


def end_to_end(n: int) -> dict:
    from bench.harness import running_server

    out = {}
    with running_server() as (url, _, _):
        with httpx.Client(timeout=600) as http:
            def ask(model: str, prompt: str) -> str:
                r = http.post(f"{url}/v1/chat/completions", json={
                    "model": model, "temperature": 0, "max_tokens": 48, "messages": [{"role": "user", "content": prompt}]})
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"]

            for s in trained_skills():
                test = examples(s, "test", n, seed=7)
                own = sum(exact_match(ask(s, p), a) for p, a in test) / n
                auto = sum(exact_match(ask("auto", p), a) for p, a in test) / n
                out[s] = {"own": own, "auto": auto}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-serve", action="store_true", help="skip the end-to-end part (no engine)")
    args = ap.parse_args()
    demo = demo_profiles()
    prompts = [p for s in trained_skills() for p, _ in examples(s, "test", 5, seed=1)] + OOD[:5]
    res: dict = {}
    r10 = PsecRouter(T)
    skills10 = demo + synthetic_profiles(7)
    res["latency_10"] = latency(r10, skills10, prompts, 2 if args.quick else 10)
    r100 = PsecRouter(T)
    skills100 = demo + synthetic_profiles(97)
    t = time.perf_counter()
    r100.train(skills100)
    cold = time.perf_counter() - t
    res["retrain_100_cold_s"] = cold
    res["latency_100"] = latency(r100, skills100, prompts, 2 if args.quick else 10)
    # retraining when one skill changes, with the other example embeddings cached in memory
    emb = {}
    texts = [t for s in skills100 for t in ([*s.examples, s.description])]
    for t_, e in zip(texts, r100.encoder.encode(texts)):
        emb[t_] = e
    from sklearn.linear_model import LogisticRegression

    X = np.stack([emb[t_] for t_ in texts])
    y = np.repeat(np.arange(len(skills100)), 7)
    t = time.perf_counter()
    LogisticRegression(C=10.0, max_iter=2000).fit(X, y)
    res["retrain_100_cached_embeddings_s"] = time.perf_counter() - t
    res["accuracy"] = accuracy(PsecRouter(T, encoder=r100.encoder), demo, 10 if args.quick else 40)
    if not args.no_serve:
        res["end_to_end"] = end_to_end(5 if args.quick else 20)
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "route.json").write_text(json.dumps(res, indent=2))
    acc = res["accuracy"]
    lines = ["# Router benchmark", "", "Generated by `python -m bench.route`. Encoder all-MiniLM-L6-v2 on the CPU; "
             f"thresholds: ood {T.ood}, mix_similarity {T.mix_similarity}, mix_min {T.mix_min}.", "",
             "| measure | value |", "|---|---|",
             f"| decision latency, 10 skills | p50 {res['latency_10']['p50_ms']:.1f} ms, p95 {res['latency_10']['p95_ms']:.1f} ms |",
             f"| decision latency, 100 skills | p50 {res['latency_100']['p50_ms']:.1f} ms, p95 {res['latency_100']['p95_ms']:.1f} ms |",
             f"| retraining at 100 skills, embeddings cold | {res['retrain_100_cold_s']:.2f} s |",
             f"| retraining at 100 skills, embeddings cached | {res['retrain_100_cached_embeddings_s']:.2f} s |",
             f"| held-out paraphrases routed to their skill | {acc['in_distribution']:.1%} of {acc['n']} |",
             f"| out-of-distribution prompts routed to base | {acc['ood_to_base']:.1%} of {acc['n_ood']} |",
             f"| two-skill prompts composed from exactly their skills | {sum(m['ok'] for m in acc['multi'])} of {len(acc['multi'])} |",
             "", "## Confusion (rows: truth, columns: decision)", ""]
    cols = list(next(iter(acc["confusion"].values())))
    lines += ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {t} | " + " | ".join(str(row[c]) for c in cols) + " |" for t, row in acc["confusion"].items()]
    lines += ["", "## Two-skill prompts", ""] + [f"- {m['kind']} {m['skills']} α={m['weights']} (expected {m['expected']}): "
                                                f"{'ok' if m['ok'] else 'MISS'}" for m in acc["multi"]]
    if "end_to_end" in res:
        e2e = res["end_to_end"]
        own = statistics.mean(v["own"] for v in e2e.values())
        auto = statistics.mean(v["auto"] for v in e2e.values())
        lines += ["", "## End to end (real server, vLLM CPU engine, greedy)", "", "| skill | own name | auto |", "|---|---|---|"]
        lines += [f"| {s} | {v['own']:.2f} | {v['auto']:.2f} |" for s, v in e2e.items()]
        lines += [f"| **mean** | {own:.3f} | {auto:.3f} |", "", f"auto / own name = **{auto / own if own else float('nan'):.3f}** "
                  "(goal ≥ 0.95)"]
    (REPORTS / "route.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
