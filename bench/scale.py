"""The library at scale (issue #16): what listing, routing and a library change cost as skills grow.

    python -m bench.scale [--sizes 100,1000] [--quick]

For each size N, N tiny synthetic skills (rank 1, one module, three example prompts built around a
made-up keyword that only that skill uses) go into a fresh key prefix of the real Redis, and the real
router (MiniLM + the PSEC network, the server's settings) is measured in this process:

- upload rate (``Registry.add``), Redis memory per skill (MEMORY USAGE of every key / N);
- listing: the whole library, and one page of 100 (``Registry.list``: three round trips whatever N);
- the router's first training on the library (encoding every example, then the fit);
- route p50/p95 on held-out prompts (another template around each skill's keyword), and the share
  routed to the skill the prompt names;
- one skill added: how long the next request waited (bounded by MOSAIC_ROUTER_TRAIN_WAIT_SECONDS: it is
  answered by the previous model meanwhile) and how long until the new skill is routable.

Writes bench/reports/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import redis
import torch

from adapter_store.adapter import LoraAdapter, factor_key
from adapter_store.registry import Registry
from router.psec import PsecRouter
from server.settings import get_settings

REPORTS = Path(__file__).resolve().parent / "reports"
MODULE = "model.layers.0.self_attn.q_proj"
TRAIN = ["Apply the {w} rewrite to: the cat sat", "Use the {w} style on this sentence: hello there",
         "Please {w} the following text: good morning"]
HELD_OUT = "Could you run {w} over: see you tomorrow?"
SYLLABLES = ["ka", "lo", "mi", "ru", "te", "po", "zi", "na", "vu", "sh", "bo", "ge", "fa", "di", "xu", "je"]


def keyword(i: int) -> str:
    """A made-up word per skill, distinct for every i (base-16 digits as syllables)."""
    out, n = [], i + 16 * 16
    while n:
        n, d = divmod(n, 16)
        out.append(SYLLABLES[d])
    return "".join(out) + "ify"


def tiny_adapter(i: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(i)
    tensors = {factor_key(MODULE, "A"): torch.randn(1, 576, generator=g) * 0.01,
               factor_key(MODULE, "B"): torch.randn(576, 1, generator=g) * 0.01}
    return LoraAdapter(config={"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}, tensors=tensors)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(client: redis.Redis, n: int, prompts: int) -> dict:
    prefix = f"bench-scale-{n}-{int(time.time())}"
    registry = Registry(client, prefix=prefix)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            w = keyword(i)
            registry.add(f"skill-{i:05d}", tiny_adapter(i), description=f"Rewrites text in the {w} style.",
                         examples=[t.format(w=w) for t in TRAIN])
        upload_s = time.perf_counter() - t0
        memory = sum(client.memory_usage(k) or 0 for k in client.scan_iter(match=f"{prefix}:*", count=1000))
        t0 = time.perf_counter()
        skills = registry.list()
        list_all_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        registry.list(after=skills[n // 2].name, limit=100)
        page_ms = (time.perf_counter() - t0) * 1000

        router = PsecRouter(get_settings().router_config(), registry)
        t0 = time.perf_counter()
        router.route("warm up", skills, registry.generation())  # the first model: trained while it waits
        first_training_s = time.perf_counter() - t0
        picks = list(range(0, n, max(1, n // prompts)))[:prompts]
        times, hits = [], 0
        for i in picks:
            t0 = time.perf_counter()
            plan = router.route(HELD_OUT.format(w=keyword(i)), skills, registry.generation())
            times.append((time.perf_counter() - t0) * 1000)
            hits += plan.kind == "skill" and plan.skill == f"skill-{i:05d}"

        new = n  # one skill more: the next request waits at most the setting, then the old model answers
        w = keyword(new)
        registry.add(f"skill-{new:05d}", tiny_adapter(new), description=f"Rewrites text in the {w} style.",
                     examples=[t.format(w=w) for t in TRAIN])
        changed = time.perf_counter()
        skills = registry.list()
        t0 = time.perf_counter()
        router.route(HELD_OUT.format(w=keyword(0)), skills, registry.generation())
        waited_s = time.perf_counter() - t0
        while router.route(HELD_OUT.format(w=w), skills, registry.generation()).skill != f"skill-{new:05d}":
            if time.perf_counter() - changed > 600:
                break
            time.sleep(0.1)
        routable_s = time.perf_counter() - changed
        routable = router.route(HELD_OUT.format(w=w), skills, registry.generation()).skill == f"skill-{new:05d}"
        return {"skills": n, "upload_per_s": n / upload_s, "redis_bytes_per_skill": memory / n,
                "list_all_ms": list_all_ms, "list_page_100_ms": page_ms, "first_training_s": first_training_s,
                "route_p50_ms": statistics.median(times), "route_p95_ms": percentile(times, 0.95),
                "held_out_accuracy": hits / len(picks), "prompts": len(picks),
                "waited_after_change_s": waited_s, "new_skill_routable_s": routable_s if routable else None,
                "train_wait_setting_s": get_settings().router_train_wait_seconds}
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])


def _routable(r: dict) -> str:
    return f"{r['new_skill_routable_s']:.1f}" if r["new_skill_routable_s"] is not None else "not in 600 s"


def report_md(rows: list[dict]) -> str:
    lines = ["# The library at scale", "",
             "Generated by `python -m bench.scale`: tiny synthetic skills (rank 1, one module, three example prompts "
             "around a keyword only that skill uses) in the real Redis; the real router (MiniLM + PSEC network) in "
             "process, on this machine's CPUs. Held-out prompts use another template around the same keyword.", "",
             "| skills | uploads/s | Redis bytes/skill | list all (ms) | page of 100 (ms) | first training (s) "
             "| route p50 / p95 (ms) | held-out accuracy | wait after a change (s) | new skill routable after (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['skills']:,} | {r['upload_per_s']:.0f} | {r['redis_bytes_per_skill']:,.0f} | "
                     f"{r['list_all_ms']:.1f} | {r['list_page_100_ms']:.1f} | {r['first_training_s']:.1f} | "
                     f"{r['route_p50_ms']:.1f} / {r['route_p95_ms']:.1f} | {r['held_out_accuracy']:.0%} "
                     f"({r['prompts']}) | {r['waited_after_change_s']:.2f} | {_routable(r)} |")
    lines += ["", f"A request after a library change waits at most `MOSAIC_ROUTER_TRAIN_WAIT_SECONDS` "
              f"({rows[0]['train_wait_setting_s']:g} s here) for the retrained router, then the previous model answers; "
              "the new skill is routable once the background training ends (the last column). The fit of the "
              "multinomial network grows with the number of skills: the retrieve-then-compose router of issue #16 "
              "is what would bound it.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--prompts", type=int, default=50, help="held-out prompts routed per size")
    ap.add_argument("--quick", action="store_true", help="100 skills, 20 prompts")
    args = ap.parse_args()
    sizes = [100] if args.quick else [int(s) for s in args.sizes.split(",")]
    client = redis.Redis.from_url(get_settings().redis_url)
    rows = [measure(client, n, 20 if args.quick else args.prompts) for n in sizes]
    for r in rows:
        print(json.dumps(r))
    REPORTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (REPORTS / f"scale{suffix}.json").write_text(json.dumps(rows, indent=2))
    (REPORTS / f"scale{suffix}.md").write_text(report_md(rows))
    print(report_md(rows))


if __name__ == "__main__":
    main()
