"""The whole benchmark report in one command: bench/reports/REPORT.md (+ REPORT.json and PNG plots).

    python -m bench.run            # full: about an hour on 2 CPU cores
    python -m bench.run --quick    # a few minutes: fewer prompts, one rank, fewer methods, short serving runs

Sections (each can be left out with --skip NAME):
  quality   exact match per demo skill: base model, the skill's own adapter, auto (the router), and every
            composition method merging all skills into one adapter at two target ranks, next to PEFT's own
            add_weighted_adapter variants; retention = merged score / own score. Greedy, transformers+PEFT
            (the reference engine; the same adapters serve identically through vLLM, tested).
  routing   the router's accuracy on held-out paraphrases, out-of-distribution prompts and two-skill
            prompts, with the confusion matrix (bench/route.py's measurement).
  compose   Mosaic vs PEFT composition speed, from bench/reports/compose.json (``--rerun-compose`` reruns
            bench/compose.py first: ~10 min, most of it PEFT's dense SVDs).
  serving   tokens/s and time to first token through Mosaic vs a plain ``vllm serve`` with the same engine
            settings, prompt and adapters: base, a skill, a composition (first request and cached), auto.
  registry  upload + fetch of a large adapter through the registry vs raw redis-py SET/GET of the same bytes.
  composition  what a composition keeps of each skill: every pair and all 8, fixed weights vs context-aware
            ("weights": "auto") vs learned (LoraHub); mixed tasks that need two skills at once (bench/composition.py).
  vllm_serve  Mosaic vs plain vLLM measured by vLLM's own benchmark client (`vllm bench serve`): a random
            adapter per request (and base only), 8 in flight, 48 requests (bench/vllm_serve.py).
  storage   the library (demo skills + variants) compressed to MoS shard pools at several pool shapes: bytes in
            Redis, per-skill error, load time and exact match before/after (bench/storage.py).
The README's Results section is rewritten from this report (between its results markers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.demo_data import examples, trained_skills
from bench.scoring import markdown_table, mean_retention, ratio, score

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "bench" / "skills"
REPORTS = ROOT / "bench" / "reports"
README = ROOT / "README.md"
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"
SECTIONS = ("quality", "routing", "compose", "serving", "registry", "storage", "composition", "vllm_serve")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- 1. quality ----------------------------------------------------------------------------------

def _answers(base: Path, adapter, prompts: list[str], batch: int = 16) -> list[str]:
    """Greedy answers with ``adapter`` (a LoraAdapter, a folder, or None for the base model)."""
    from adapter_store.adapter import LoraAdapter
    from server.training import greedy_answers

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

    from server.base_model import prepare
    from server.settings import get_settings

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


def quality(quick: bool) -> dict:
    from adapter_store.adapter import LoraAdapter
    from bench.route import demo_profiles
    from composer import compose
    from composer.registry import METHODS
    from router.psec import PsecRouter
    from server.base_model import prepare
    from server.settings import get_settings

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
    router, profiles = PsecRouter(), demo_profiles()
    groups: dict[tuple, list[int]] = {}
    plans = {}
    for i, p in enumerate(prompts):
        plan = router.route(p, profiles)
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


# ---- 2. routing ----------------------------------------------------------------------------------

def routing(quick: bool) -> dict:
    from bench.route import accuracy, demo_profiles, latency
    from router.psec import PsecRouter, Thresholds

    router = PsecRouter()
    profiles = demo_profiles()
    acc = accuracy(router, profiles, 10 if quick else 40)
    prompts = [p for s in trained_skills() for p, _ in examples(s, "test", 3, seed=1)]
    acc["latency"] = latency(router, profiles, prompts, 2 if quick else 5)
    acc["thresholds"] = vars(Thresholds())
    return acc


# ---- 3. compose speed ------------------------------------------------------------------------------

def compose_speed(rerun: bool) -> dict:
    if rerun:
        import subprocess

        subprocess.run([sys.executable, "-m", "bench.compose"], cwd=ROOT, check=True)
    path = REPORTS / "compose.json"
    if not path.exists():
        return {"missing": "run python -m bench.compose (or bench.run --rerun-compose)"}
    data = json.loads(path.read_text())
    data["source"] = "rerun now" if rerun else "the committed bench/reports/compose.json (an earlier run; --rerun-compose reruns it)"
    return data


# ---- 4. serving: Mosaic vs plain vLLM --------------------------------------------------------------

PROMPT = "Write a short story about a robot who learns to paint. Use at least five sentences."


def _stream(url: str, body: dict) -> dict:
    """One streamed chat request: time to first token, total time, completion tokens."""
    t0 = time.perf_counter()
    ttft, tokens, mosaic = None, 0, None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            mosaic = mosaic or chunk.get("mosaic")
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"ttft_s": ttft, "seconds": total, "tokens": tokens, "tokens_per_s": tokens / total, "mosaic": mosaic}


def _cases(url: str, model_of: dict, requests: int, max_tokens: int, first_only: set[str]) -> dict:
    out = {}
    for case, extra in model_of.items():
        body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": max_tokens,
                "ignore_eos": True, **extra}
        n = 1 if case in first_only else requests
        out[case] = [_stream(url, body) for _ in range(n)]
    return out


def _summary(runs: list[dict]) -> dict:
    return {"requests": len(runs), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs if r["ttft_s"] is not None)}


def serving(quick: bool) -> dict:
    from adapter_store.adapter import LoraAdapter
    from bench.harness import running_server
    from composer import compose
    from server.launch import VLLM_SERVE
    from server.launch import serving as launch
    from server.settings import Settings

    requests, max_tokens = (1, 16) if quick else (3, 64)
    skills = trained_skills()
    skill, pair = "json_extract", ["json_extract", "sentiment"]
    comp = {"skills": pair, "weights": [1.0, 0.5]}
    res: dict = {"requests": requests, "max_tokens": max_tokens}
    with running_server() as (url, env, health):
        base_id = health["base_model"]
        auto_prompt_plan = httpx.post(f"{url}/v1/route", json={"prompt": PROMPT}, timeout=60).json()
        _stream(url, {"model": base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # warm-up
        cases = {"base": {"model": base_id}, "skill (first request: adapter load)": {"model": skill},
                 "skill": {"model": skill}, "composition (first request: compose + load)": {"model": base_id, "composition": comp},
                 "composition (cached)": {"model": base_id, "composition": comp}, "auto": {"model": "auto"}}
        res["mosaic"] = _cases(url, cases, requests, max_tokens, {"skill (first request: adapter load)",
                                                                  "composition (first request: compose + load)"})
        res["auto_plan"] = auto_prompt_plan
        res["mosaic_engine_start_s"] = health.get("engine_start_seconds")
    # the same engine settings, adapters and prompt through a plain `vllm serve`
    s = Settings()
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    merged, _ = compose([LoraAdapter.from_dir(SKILLS / x) for x in pair], [1.0, 0.5], method="linear")
    merged.save_dir(work / "composition")
    plan_skill = auto_prompt_plan.get("skill") if auto_prompt_plan.get("kind") == "skill" else None
    modules = [f"{skill}={SKILLS / skill}", f"composition={work / 'composition'}"]
    if plan_skill and plan_skill != skill:
        modules.append(f"{plan_skill}={SKILLS / plan_skill}")
    argv = [*VLLM_SERVE, "--model", env["MOSAIC_BASE_MODEL"], "--port", "{port}",
            "--served-model-name", base_id, "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
            "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.max_cpu_loras), "--max-model-len", str(s.max_model_len),
            "--dtype", s.dtype, "--enforce-eager", "--lora-modules", *modules]
    venv = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib)}
    with launch(venv, work / "vllm.log", argv=argv) as (url, _, ready_s):
        _stream(url, {"model": base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        auto_equiv = {"model": plan_skill} if plan_skill else {"model": base_id}
        cases = {"base": {"model": base_id}, "skill (first request: adapter load)": {"model": skill}, "skill": {"model": skill},
                 "composition (first request: compose + load)": {"model": "composition"},
                 "composition (cached)": {"model": "composition"}, "auto": auto_equiv}
        res["vllm"] = _cases(url, cases, requests, max_tokens, {"skill (first request: adapter load)",
                                                                "composition (first request: compose + load)"})
        res["vllm_ready_s"] = ready_s
    res["table"] = []
    for case in res["mosaic"]:
        m, v = _summary(res["mosaic"][case]), _summary(res["vllm"][case])
        res["table"].append({"case": case, "mosaic": m, "vllm": v, "tps_ratio": ratio(m["tokens_per_s"], v["tokens_per_s"]),
                             "ttft_ratio": ratio(m["ttft_s"], v["ttft_s"])})
    steady = [r["tps_ratio"] for r in res["table"] if "first" not in r["case"]]
    res["steady_tps_ratio_mean"] = statistics.mean(steady)
    return res


# ---- 5. registry ------------------------------------------------------------------------------------

def registry(quick: bool) -> dict:
    import uuid

    import redis
    import torch

    from adapter_store.adapter import LoraAdapter, factor_key
    from adapter_store.registry import Registry
    from server.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    prefix = f"mosaic-bench-{uuid.uuid4().hex[:8]}"
    layers = 4 if quick else 16
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):  # Llama-7B-sized q/v projections at rank 64, bf16
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            tensors[factor_key(name, "A")] = torch.randn(64, 4096, generator=g).to(torch.bfloat16)
            tensors[factor_key(name, "B")] = torch.randn(4096, 64, generator=g).to(torch.bfloat16)
    adapter = LoraAdapter(config={"peft_type": "LORA", "r": 64, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"],
                                  "base_model_name_or_path": "bench"}, tensors=tensors)
    blob = adapter.weights_bytes()
    reps = 3 if quick else 7
    reg = Registry(client, prefix=prefix)
    ours, raw = [], []
    try:
        for i in range(reps):
            t = time.perf_counter()
            info = reg.add("big", adapter)
            _, back = reg.load(info.ref)
            ours.append(time.perf_counter() - t)
            assert back.sha256() == info.sha256
            t = time.perf_counter()
            client.set(f"{prefix}:raw:{i}", blob)
            got = client.get(f"{prefix}:raw:{i}")
            raw.append(time.perf_counter() - t)
            assert got == blob
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    mb = len(blob) / 2**20
    o, r = statistics.median(ours), statistics.median(raw)
    return {"mib": mb, "reps": reps, "mosaic_s": o, "raw_s": r, "mosaic_mib_s": 2 * mb / o, "raw_mib_s": 2 * mb / r,
            "ratio": ratio(2 * mb / o, 2 * mb / r)}


# ---- the report ---------------------------------------------------------------------------------------

def _plot_quality(q: dict, path: Path) -> None:
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


def _plot_serving(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r["case"] for r in s["table"]]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [r["mosaic"]["tokens_per_s"] for r in s["table"]], 0.4, label="Mosaic")
    ax.bar([i + 0.2 for i in x], [r["vllm"]["tokens_per_s"] for r in s["table"]], 0.4, label="plain vLLM")
    ax.set_xticks(list(x), [c.replace(" (", "\n(") for c in cases], fontsize=7)
    ax.set_ylabel("tokens/s (one request at a time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _storage(quick: bool) -> dict:
    from bench import storage

    res = storage.run(quick, n=5 if quick else 20)
    storage.write(res)
    return res


def _composition(quick: bool) -> dict:
    from bench import composition

    res = composition.run(3 if quick else 6, quick)
    composition.write(res)
    return res


def _vllm_serve(quick: bool) -> dict:
    from bench import vllm_serve

    ns = argparse.Namespace(requests=16 if quick else 48, concurrency=8, adapters=6, input_len=64, output_len=16 if quick else 32,
                            rounds=1 if quick else 2)
    res = vllm_serve.run(ns)
    if not quick:
        vllm_serve.write(res)
    return res


def render(res: dict, quick: bool) -> tuple[str, str]:
    """(REPORT.md, the README's Results section)."""
    L = ["# Mosaic benchmark report", "",
         f"Generated by `python -m bench.run{' --quick' if quick else ''}` on {res['date']} ({res['machine']}). "
         "Every number below comes from this run unless a section says otherwise.", ""]
    headline = []
    if q := res.get("quality"):
        best = max((r for r in q["rows"] if "engine" in r), key=lambda r: r["mean_retention"])
        lego = [r for r in q["rows"] if r.get("method") == "lego"]
        others = [r for r in q["rows"] if "engine" in r and r.get("method") != "lego"]
        lego_best = max(r["mean_retention"] for r in lego) if lego else float("nan")
        others_best = max(others, key=lambda r: r["mean_retention"])
        auto = next(r for r in q["rows"] if r["config"] == "auto (router)")
        L += ["## 1. Quality: all skills in one adapter", "",
              f"{len(q['skills'])} demo skills, {q['prompts_per_skill']} held-out prompts each (test templates never "
              "trained on), greedy exact match through transformers+PEFT. Every merge uses the same weight λ = "
              f"{q['weight']:.3g} per skill — the best λ for the exact sum (`linear`) on pilot prompts of another seed "
              f"(pilot exact match by λ: {q['weight_pilot']}) — and each method's default parameters (density 0.5 for "
              "PEFT's pruning variants). Retention = merged score / the skill's own adapter score, averaged over skills.", "", f"![quality](quality{'_quick' if quick else ''}.png)", ""]
        header = ["config", "rank", *q["skills"], "mean EM", "mean retention"]
        L += markdown_table(header, [[r["config"], r["rank"] if r["rank"] is not None else "–",
                                      *[f"{r['scores'][s]:.2f}" for s in q["skills"]], f"{r['mean']:.3f}",
                                      f"{r['mean_retention']:.3f}"] for r in q["rows"]])
        verdict = "beats" if lego_best > others_best["mean_retention"] else "does not beat"
        L += ["", f"**Headline:** `lego`'s best mean retention {lego_best:.3f} {verdict} the best other merge "
              f"({others_best['config']} r={others_best['rank']}: {others_best['mean_retention']:.3f}); best overall: "
              f"{best['config']} r={best['rank']} ({best['mean_retention']:.3f}). Routing instead of merging (`auto`) "
              f"retains {auto['mean_retention']:.3f}.", ""]
        headline.append(f"| quality: mean retention, all {len(q['skills'])} skills merged | lego best {lego_best:.2f}; "
                        f"best merge {best['config']} r={best['rank']} {best['mean_retention']:.2f}; auto {auto['mean_retention']:.2f} |")
    if r := res.get("routing"):
        L += ["## 2. Routing", "", f"Thresholds {r['thresholds']}. Decision latency p50 {r['latency']['p50_ms']:.1f} ms, "
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
        headline.append(f"| routing accuracy | {r['in_distribution']:.1%} held-out in-distribution, {r['ood_to_base']:.1%} "
                        f"out-of-distribution to base, {sum(m['ok'] for m in r['multi'])}/{len(r['multi'])} two-skill |")
    if c := res.get("compose"):
        L += ["## 3. Composition speed", ""]
        if "llama" in c:
            ll = c["llama"]
            L += [f"From `python -m bench.compose`, {c.get('source', '')}; details in [compose.md](compose.md). Mosaic `svd` vs "
                  "PEFT `add_weighted_adapter(svd)`, K = 4 rank-16 adapters on Llama-2-7B shapes, per layer.", "",
                  *markdown_table(["", "seconds per layer", "peak MiB above inputs", "relative error"], [
                      ["Mosaic", ll["mosaic"]["seconds"] / ll["mosaic"]["layers"], ll["mosaic"]["peak_mib"], ll["mosaic"]["error"]],
                      ["PEFT", ll["peft"]["seconds"] / ll["peft"]["layers"], ll["peft"]["peak_mib"], ll["peft"]["error"]]]),
                  "", f"**Mosaic / PEFT speed: {ll['ratio']:.0f}×** per layer at equal error.", ""]
            headline.append(f"| compose speed, Mosaic svd vs PEFT svd (7B shapes) | {ll['ratio']:.0f}× faster per layer, same error |")
        else:
            L += [c.get("missing", "not measured"), ""]
    if s := res.get("serving"):
        L += ["## 4. Serving: Mosaic vs plain vLLM", "",
              f"One request at a time, streamed, {s['max_tokens']} tokens each (ignore_eos), median of {s['requests']}; "
              "the same engine settings, prompt and adapter folders through `mosaic serve` and a plain `vllm serve` "
              "(`--lora-modules`). 'auto' on plain vLLM is the skill Mosaic's router chose "
              f"({s['auto_plan'].get('kind')} {s['auto_plan'].get('skill') or ''}).", "", f"![serving](serving{'_quick' if quick else ''}.png)", "",
              *markdown_table(["case", "Mosaic tok/s", "vLLM tok/s", "ratio", "Mosaic TTFT s", "vLLM TTFT s", "TTFT ratio"], [
                  [t["case"], t["mosaic"]["tokens_per_s"], t["vllm"]["tokens_per_s"], t["tps_ratio"], t["mosaic"]["ttft_s"],
                   t["vllm"]["ttft_s"], t["ttft_ratio"]] for t in s["table"]]),
              "", f"**Mosaic / vLLM tokens/s (steady-state cases): {s['steady_tps_ratio_mean']:.3f}** (goal ≥ 0.95: "
              f"{'met' if s['steady_tps_ratio_mean'] >= 0.95 else 'NOT met'}).", ""]
        headline.append(f"| serving tokens/s, Mosaic / plain vLLM | {s['steady_tps_ratio_mean']:.2f} (goal ≥ 0.95) |")
    if g := res.get("registry"):
        L += ["## 5. Registry", "", f"A {g['mib']:.0f} MiB adapter (bf16, rank 64 on 7B q/v shapes): `Registry.add` + `Registry.load` "
              "(safetensors, hashing, metadata, MULTI/EXEC) vs raw redis-py SET + GET of the same bytes; median of "
              f"{g['reps']}.", "", *markdown_table(["", "seconds (upload + fetch)", "MiB/s"], [
                  ["Mosaic registry", g["mosaic_s"], g["mosaic_mib_s"]], ["raw redis-py", g["raw_s"], g["raw_mib_s"]]]),
              "", f"**Registry / raw: {g['ratio']:.2f}** (goal ≥ 0.5: {'met' if g['ratio'] >= 0.5 else 'NOT met'}).", ""]
        headline.append(f"| registry throughput, Mosaic / raw redis-py | {g['ratio']:.2f} (goal ≥ 0.5) |")
    if st := res.get("storage"):
        from bench import storage

        L += [storage.render(st).replace("storage.png", f"storage{'_quick' if quick else ''}.png"), ""]
        best = storage.best_at_one_point(st)
        headline.append(f"| storage, {st['skills']} skills as MoS shards | "
                        + (f"{best['ratio']:.1f}× fewer bytes in Redis at "
                           f"{100 * (best['exact_match_mean'] - st['baseline']['exact_match_mean']):+.1f} points exact match "
                           "(goal ≥ 4× at ≤ 1 point loss) |" if best else "no configuration within 1 point |"))
    if co := res.get("composition"):
        from bench import composition

        body = composition.render(co).replace("composition.png", f"composition{'_quick' if quick else ''}.png")
        body = body.replace("# Composition retention", "## 7. Composition retention", 1).replace("\n## ", "\n### ")
        L += [body.replace("### 7. Composition", "## 7. Composition"), ""]
        headline += composition.headline(co)
    if vs := res.get("vllm_serve"):
        from bench import vllm_serve

        body = vllm_serve.render(vs).replace("# Serving: Mosaic vs plain vLLM", "## 8. Serving under load: Mosaic vs plain vLLM", 1)
        L += [body, ""]
        headline.append(f"| serving under load | {vllm_serve.headline(vs)} (goal ≥ 0.97 / ≤ 1.05) |")
    results = ["| measure | result |", "|---|---|", *headline]
    return "\n".join(L) + "\n", "\n".join(results)


def update_readme(section: str, quick: bool) -> None:
    text = README.read_text()
    block = (f"{MARK_START}\n<!-- written by `python -m bench.run`; edit bench/run.py, not this block -->\n"
             f"From [bench/reports/REPORT.md](bench/reports/REPORT.md){' (the --quick run)' if quick else ''}:\n\n"
             f"{section}\n\n![quality](bench/reports/quality.png)\n{MARK_END}")
    if MARK_START in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text += f"\n## Results\n\n{block}\n"
    README.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS)
    ap.add_argument("--rerun-compose", action="store_true")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the skipped sections' results from the last REPORT.json (run timing-sensitive parts alone)")
    args = ap.parse_args()
    import platform

    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU"}
    last = REPORTS / ("REPORT_quick.json" if args.quick else "REPORT.json")
    if args.reuse and last.exists():
        res.update({k: v for k, v in json.loads(last.read_text()).items() if k in args.skip})
    steps = {"quality": lambda: quality(args.quick), "routing": lambda: routing(args.quick),
             "compose": lambda: compose_speed(args.rerun_compose), "serving": lambda: serving(args.quick),
             "registry": lambda: registry(args.quick), "storage": lambda: _storage(args.quick),
             "composition": lambda: _composition(args.quick), "vllm_serve": lambda: _vllm_serve(args.quick)}
    for name, fn in steps.items():
        if name in args.skip:
            continue
        log(f"{name} ...")
        t = time.time()
        res[name] = fn()
        log(f"{name} done in {time.time() - t:.0f} s")
    REPORTS.mkdir(exist_ok=True)
    name = "REPORT_quick" if args.quick else "REPORT"
    (REPORTS / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    suffix = "_quick" if args.quick else ""
    if "quality" in res:
        _plot_quality(res["quality"], REPORTS / f"quality{suffix}.png")
    if "serving" in res:
        _plot_serving(res["serving"], REPORTS / f"serving{suffix}.png")
    md, section = render(res, args.quick)
    (REPORTS / f"{name}.md").write_text(md)
    if not args.no_readme and not args.quick:
        update_readme(section, args.quick)
    print(md)


if __name__ == "__main__":
    main()
