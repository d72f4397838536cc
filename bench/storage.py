"""MoS shard storage of the skill library: bytes in Redis against exact match, for several pool shapes.

    python -m bench.storage [--quick] [--n 20]      (also section 6 of `python -m bench.run`)

The library is the eight demo skills (bench/skills/) plus their variants (bench/skills_library/:
other seeds, smaller training sets; `python -m bench.train_demo_skills --library`). For each
configuration the library is uploaded to a fresh key prefix of the real Redis, compressed with
``compress_library`` (what `mosaic skills compress` runs), and measured: bytes of weights in Redis
(HSTRLEN of the stored fields plus the pools; and Redis's own MEMORY USAGE of every key), per-skill
relative error (trace formula), load time (Registry.load: decode included, pools not cached), and
greedy exact match of every skill on held-out prompts of its task, served from the decoded shards.
Writes bench/reports/storage.json, storage.md and storage.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import uuid
from pathlib import Path

import torch

from adapter_store.compression import CompressOptions, compress_library
from adapter_store.registry import Registry
from bench.demo_data import exact_match, examples
from lora.adapter import LoraAdapter
from server.core.base_model import prepare
from server.core.settings import get_settings

HERE = Path(__file__).parent
REPORTS = HERE / "reports"
# (shard width, pool size, error budget): bits per value of the shared part = log2(pool size) / width
GRID = [
    (8, 256, 0.99), (4, 16, 0.99), (4, 256, 0.99), (4, 4096, 0.99), (2, 256, 0.99),
    (8, 256, 0.3), (4, 256, 0.2),
]
QUICK_GRID = [(4, 256, 0.99), (2, 256, 0.99)]


def library() -> dict[str, tuple[str, Path]]:
    """name -> (task, folder) for every skill of the benchmark library."""
    out = {}
    for root in (HERE / "skills", HERE / "skills_library"):
        for folder in sorted(p for p in root.iterdir() if (p / "mosaic.json").exists()):
            meta = json.loads((folder / "mosaic.json").read_text())
            out[folder.name] = (meta.get("skill", folder.name), folder)
    return out


class Evaluator:
    """The base model loaded once; each adapter is merged into a copy of the target weights, used
    for greedy generation, then the weights are put back (what PEFT's merge_and_unload computes)."""

    def __init__(self, base: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    @torch.inference_mode()
    def answers(self, adapter: LoraAdapter | None, prompts: list[str]) -> list[str]:
        from server.jobs.training import generate_greedy

        saved = {}
        try:
            for name, m in (adapter.modules() if adapter else {}).items():
                layer = self.model.get_submodule(name)
                saved[name] = layer.weight.detach().clone()
                layer.weight += m.scaling * (m.B @ m.A)
            return generate_greedy(self.model, self.tokenizer, prompts, 48, batch_size=len(prompts))
        finally:
            for name, w in saved.items():
                self.model.get_submodule(name).weight.copy_(w)


def score(evaluator: Evaluator, adapters: dict[str, LoraAdapter], tasks: dict[str, str], n: int) -> dict[str, float]:
    out = {}
    for name, adapter in adapters.items():
        test = examples(tasks[name], "test", n)
        got = evaluator.answers(adapter, [p for p, _ in test])
        out[name] = sum(exact_match(g, a) for g, (_, a) in zip(got, test)) / n
    return out


def redis_memory(registry: Registry) -> int:
    return sum(registry.r.memory_usage(k) or 0 for k in registry.r.scan_iter(match=f"{registry.prefix}:*"))


def run_config(client, skills: dict[str, tuple[str, Path]], originals: dict[str, LoraAdapter],
               evaluator: Evaluator, width: int, pool: int, budget: float, n: int) -> dict:
    registry = Registry(client, prefix=f"mosaic-bench-{uuid.uuid4().hex[:8]}")
    try:
        for name, adapter in originals.items():
            registry.add(name, adapter)
        memory_before = redis_memory(registry)
        options = CompressOptions(shard_width=width, pool_size=pool, error_budget=budget, max_private=0.9)
        report = compress_library(registry, options)
        memory_after = redis_memory(registry)
        loaded, load_s = {}, []
        for name in originals:
            registry._pool_cache.clear()  # a cold reader: pools come from Redis too
            t0 = time.perf_counter()
            loaded[name] = registry.load(name)[1]
            load_s.append(time.perf_counter() - t0)
        em = score(evaluator, loaded, {k: v[0] for k, v in skills.items()}, n)
        errors = {r["ref"].split("@")[0]: r["error"] for r in report.versions}
        return {
            "shard_width": width, "pool_size": pool, "error_budget": budget,
            "bits_per_value": round(math.log2(pool) / width, 3),
            "bytes_before": report.bytes_before, "bytes_after": report.bytes_after, "ratio": report.ratio,
            "pool_bytes": report.pool_bytes, "redis_memory_before": memory_before,
            "redis_memory_after": memory_after, "redis_memory_ratio": memory_before / max(1, memory_after),
            "exact": sum(r["stored"] == "exact" for r in report.versions),
            "error": errors, "error_mean": statistics.fmean(errors.values()), "error_max": max(errors.values()),
            "private_mean": statistics.fmean(float(r.get("private", 0.0)) for r in report.versions),
            "load_ms_median": 1000 * statistics.median(load_s), "compress_s": report.seconds,
            "exact_match": em, "exact_match_mean": statistics.fmean(em.values()),
        }
    finally:
        keys = list(client.scan_iter(match=f"{registry.prefix}:*"))
        if keys:
            client.delete(*keys)


def render(res: dict) -> str:
    base = res["baseline"]
    lines = [
        "## 6. Storage: the library as MoS shard pools",
        "",
        f"Library: {res['skills']} skills (the 8 demo skills and {res['skills'] - 8} variants with other seeds or "
        f"100 instead of 400 training examples), rank 8 on q/k/v/o of all 30 layers, bf16: "
        f"{res['bytes_exact']:,} bytes of weights. Exact match: greedy, {res['n']} held-out prompts per skill "
        f"({res['n'] * res['skills']} in all), served from the decoded shards (transformers, weights merged). "
        f"Exact storage: mean exact match **{base['exact_match_mean']:.3f}**, Registry.load "
        f"{base['load_ms_median']:.1f} ms median.",
        "",
        "| shard width | pool size | bits/value (shared) | error budget | bytes after (ratio) | Redis memory ratio "
        "| stored exact | mean / max rel. error | private shards | exact match (Δ points) | load ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        delta = 100 * (c["exact_match_mean"] - base["exact_match_mean"])
        budget = "none" if c["error_budget"] >= 0.99 else f"{c['error_budget']:g}"
        lines.append(
            f"| {c['shard_width']} | {c['pool_size']} | {c['bits_per_value']:g} | {budget} | "
            f"{c['bytes_after']:,} (**{c['ratio']:.1f}×**) | {c['redis_memory_ratio']:.1f}× | {c['exact']} | "
            f"{c['error_mean']:.3f} / {c['error_max']:.3f} | {c['private_mean']:.1%} | "
            f"{c['exact_match_mean']:.3f} ({delta:+.1f}) | {c['load_ms_median']:.1f} |")
    best = best_at_one_point(res)
    lines += ["", "Largest ratio at ≤ 1 point mean exact-match loss: "
              + (f"**{best['ratio']:.1f}×** (shard width {best['shard_width']}, pool size {best['pool_size']}, "
                 f"budget {'none' if best['error_budget'] >= 0.99 else best['error_budget']})." if best else "none of these."),
              f"Differences of about ±{100 * (0.25 / (res['n'] * res['skills'])) ** 0.5:.1f} points are noise at "
              f"{res['n'] * res['skills']} prompts (one binomial standard error at p = 0.5). Private shards are "
              "stored exact (bf16), so buying error down with them costs far more bytes than a larger pool or "
              "narrower shards at the same error.",
              "", "![bytes vs exact match](storage.png)", ""]
    per_skill = ["| skill | exact | " + " | ".join(f"w{c['shard_width']}/n{c['pool_size']}/b{c['error_budget']:g}"
                                                    for c in res["configs"]) + " |",
                 "|---|---|" + "---|" * len(res["configs"])]
    for name in base["exact_match"]:
        per_skill.append(f"| {name} | {base['exact_match'][name]:.2f} | " + " | ".join(
            f"{c['exact_match'][name]:.2f} (e {c['error'][name]:.2f})" for c in res["configs"]) + " |")
    lines += ["Per skill: exact match (relative error).", "", *per_skill, ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = res["baseline"]["exact_match_mean"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in res["configs"]:
        ax.scatter(c["ratio"], 100 * (c["exact_match_mean"] - base), color="C0" if c["error_budget"] >= 0.99 else "C1")
        ax.annotate(f"w{c['shard_width']} n{c['pool_size']}" + ("" if c["error_budget"] >= 0.99 else f" e≤{c['error_budget']:g}"),
                    (c["ratio"], 100 * (c["exact_match_mean"] - base)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(-1, color="grey", ls="--", lw=0.8)
    ax.axvline(4, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes before / after (weights + pools in Redis)")
    ax.set_ylabel("Δ mean exact match (points)")
    ax.set_title(f"MoS shard storage, {res['skills']} skills")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(quick: bool = False, n: int = 20) -> dict:
    """Measure every configuration of the grid (QUICK_GRID with ``quick``) on the whole library."""
    import redis

    client = redis.Redis.from_url(get_settings().redis_url)
    skills = library()
    tasks = {k: v[0] for k, v in skills.items()}
    originals = {name: LoraAdapter.from_dir(folder) for name, (_, folder) in skills.items()}
    evaluator = Evaluator(prepare(get_settings()))
    t0 = time.perf_counter()
    baseline = {"exact_match": score(evaluator, originals, tasks, n)}
    baseline["exact_match_mean"] = statistics.fmean(baseline["exact_match"].values())
    registry = Registry(client, prefix=f"mosaic-bench-{uuid.uuid4().hex[:8]}")
    try:
        for name, adapter in originals.items():
            registry.add(name, adapter)
        load_s = []
        for name in originals:
            t = time.perf_counter()
            registry.load(name)
            load_s.append(time.perf_counter() - t)
        baseline["load_ms_median"] = 1000 * statistics.median(load_s)
    finally:
        client.delete(*client.scan_iter(match=f"{registry.prefix}:*"))
    print(f"exact storage: mean exact match {baseline['exact_match_mean']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    configs = []
    for width, pool, budget in QUICK_GRID if quick else GRID:
        c = run_config(client, skills, originals, evaluator, width, pool, budget, n)
        configs.append(c)
        print(f"w={width} n={pool} budget={budget}: {c['ratio']:.2f}x, error {c['error_mean']:.3f}, "
              f"exact match {c['exact_match_mean']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"skills": len(skills), "n": n, "bytes_exact": sum(len(a.weights_bytes()) for a in originals.values()),
            "baseline": baseline, "configs": configs, "quick": quick, "date": time.strftime("%Y-%m-%d"),
            "seconds": time.perf_counter() - t0}


def best_at_one_point(res: dict) -> dict | None:
    """The configuration with the largest ratio whose mean exact match is at most 1 point below exact."""
    base = res["baseline"]["exact_match_mean"]
    ok = [c for c in res["configs"] if 100 * (base - c["exact_match_mean"]) <= 1.0]
    return max(ok, key=lambda c: c["ratio"]) if ok else None


def write(res: dict, folder: Path = REPORTS) -> str:
    stem = "storage_quick" if res["quick"] else "storage"
    folder.mkdir(exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(res, indent=2))
    plot(res, folder / f"{stem}.png")
    md = render(res).replace("storage.png", f"{stem}.png")
    (folder / f"{stem}.md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=20, help="held-out prompts per skill")
    args = ap.parse_args()
    print(write(run(args.quick, args.n)))


if __name__ == "__main__":
    main()
