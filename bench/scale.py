"""The library at scale (issue #16): what listing, routing and a library change cost as skills grow.

    python -m bench.scale [--sizes 100,1000,10000] [--quick]

For each size N, N tiny synthetic skills (rank 1, one module, three example prompts built around a
made-up keyword that only that skill uses, and a description) go into a fresh key prefix of the real
Redis, and the real router (MiniLM, retrieve-then-compose, the server's settings) is measured in this
process:

- upload rate (``Registry.add``), Redis memory per skill (MEMORY USAGE of every key / N) after the upload,
  and the router's own bytes per skill (its embedding cache and stored model) after it is trained;
- listing: the whole library, and one page of 100 (``Registry.list``: three round trips whatever N);
- pre-warming the embedding cache: MiniLM encodes every profile text once (a one-time cost per text,
  shared through Redis by every replica and restart). The encodings are kept on disk
  (``MOSAIC_DATA_DIR/scale-emb-*.npy``) so a rerun loads them; the report gives the rate measured when
  they were encoded;
- cold start: the first request's wait with no model yet (the profile index from the cache, no fit),
  and the first training (index and, up to ``MOSAIC_ROUTER_LR_MAX_SKILLS`` skills, the network's fit);
- route p50/p95 on held-out prompts (another template around each skill's keyword): the share routed
  to exactly the skill the prompt names, and the share whose plan leads with it;
- one skill added (its texts not pre-warmed): a client routes in a loop, reading the library as the server
  does (:class:`adapter_store.library_view.LibraryView`: only the changed skills); the longest any of its requests
  waited (bounded by MOSAIC_ROUTER_TRAIN_WAIT_SECONDS; the previous model answers meanwhile) and how long
  until the new skill is routable; then the same with the wait set to 0.

Writes bench/reports/scale.json and scale.md (bench/reports/scale_lr.json: the logistic-regression router
before retrieval, commit fc40a94, for comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import redis
import torch

from adapter_store.library_view import LibraryView
from adapter_store.registry import Registry
from bench.scoring import percentile
from lora.adapter import LoraAdapter, factor_key
from router.embeddings import EMB_KEY
from router.psec import PsecRouter
from server.core.settings import get_settings

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


def profile(i: int) -> list[str]:
    """Skill i's profile texts, in the router's order (examples, then the description)."""
    w = keyword(i)
    return [t.format(w=w) for t in TRAIN] + [f"Rewrites text in the {w} style."]


def add_skill(registry: Registry, i: int) -> None:
    texts = profile(i)
    registry.add(f"skill-{i:05d}", tiny_adapter(i), description=texts[-1], examples=texts[:-1])


def encodings(router: PsecRouter, n: int) -> tuple[np.ndarray, float]:
    """Skills 0..n-1's profile embeddings and the encoding rate (texts/s) measured when they were encoded."""
    data = get_settings().data_dir
    for f in sorted(data.glob("scale-emb-*.npy"), key=lambda f: int(f.stem.rsplit("-", 1)[1])):
        if int(f.stem.rsplit("-", 1)[1]) >= n:
            meta = json.loads(f.with_suffix(".json").read_text())
            return np.load(f, mmap_mode="r")[: 4 * n], meta["texts"] / meta["seconds"]
    texts = [t for i in range(n) for t in profile(i)]
    t0 = time.perf_counter()
    emb = router.encoder.encode(texts)
    seconds = time.perf_counter() - t0
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / f"scale-emb-{n}.npy", emb)
    (data / f"scale-emb-{n}.json").write_text(json.dumps({"texts": len(texts), "seconds": seconds}))
    return emb, len(texts) / seconds


def prewarm(router: PsecRouter, registry: Registry, n: int) -> float:
    """Skills 0..n-1's embeddings into the router's cache; the encoding rate."""
    emb, rate = encodings(router, n)
    texts = [t for i in range(n) for t in profile(i)]
    for lo in range(0, len(texts), 5000):
        registry.aux.add_fields(EMB_KEY, {hashlib.sha1(f"{router.encoder.name}\0{t}".encode()).hexdigest():
                                          np.asarray(emb[lo + j], dtype=np.float32).tobytes()
                                          for j, t in enumerate(texts[lo:lo + 5000])})
    return rate


def library_change(router: PsecRouter, view: LibraryView, new: int) -> tuple[float, float | None, list[float], float]:
    """Skill ``new`` added while a client routes in a loop, each request reading the library as the server
    does (``view``, up to date before the change): (the longest wait, seconds until the new skill is routable
    or None, every request's latency in ms, the first request's read of the library in ms)."""
    registry = view.registry
    view.current()
    add_skill(registry, new)
    changed = time.perf_counter()
    waits, first_read_ms = [], None
    while time.perf_counter() - changed < 120:
        t0 = time.perf_counter()
        generation, skills = view.read()
        first_read_ms = first_read_ms if first_read_ms is not None else (time.perf_counter() - t0) * 1000
        plan = router.route(HELD_OUT.format(w=keyword(new)), skills, generation)
        waits.append((time.perf_counter() - t0) * 1000)
        if plan.skill == f"skill-{new:05d}":
            return max(waits) / 1000, time.perf_counter() - changed, waits, first_read_ms
        time.sleep(0.02)
    return max(waits) / 1000, None, waits, first_read_ms


def measure(client: redis.Redis, n: int, prompts: int) -> dict:
    prefix = f"bench-scale-{n}-{int(time.time())}"
    registry = Registry(client, prefix=prefix)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            add_skill(registry, i)
        upload_s = time.perf_counter() - t0
        memory = sum(client.memory_usage(k) or 0 for k in client.scan_iter(match=f"{prefix}:*", count=1000))
        t0 = time.perf_counter()
        skills = registry.list()
        list_all_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        registry.list(after=skills[n // 2].name, limit=100)
        page_ms = (time.perf_counter() - t0) * 1000

        config = get_settings().router_config()
        router = PsecRouter(config, registry)
        router.encoder.encode(["load the encoder"])
        rate = prewarm(router, registry, n)
        t0 = time.perf_counter()
        router.route("warm up", skills, registry.generation())  # no model yet: the index, not the fit
        cold_start_s = time.perf_counter() - t0
        router.trained(skills)
        first_training_s = time.perf_counter() - t0
        router_bytes = sum(client.memory_usage(k) or 0 for k in client.scan_iter(match=f"{prefix}:aux:*", count=1000))
        picks = list(range(0, n, max(1, n // prompts)))[:prompts]
        times, encode, hits, leads, nearest = [], [], 0, 0, 0
        for i in picks:  # the prompt's encoding alone (constant in N), then the whole decision
            t0 = time.perf_counter()
            router.encoder.encode([HELD_OUT.format(w=keyword(i))])
            encode.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            plan = router.route(HELD_OUT.format(w=keyword(i)), skills, registry.generation())
            times.append((time.perf_counter() - t0) * 1000)
            hits += plan.kind == "skill" and plan.skill == f"skill-{i:05d}"
            leads += bool(plan.skills) and plan.skills[0] == f"skill-{i:05d}"
            nearest += max(plan.similarity, key=plan.similarity.get, default=None) == f"skill-{i:05d}"
        p99 = percentile(times, 99)
        view = LibraryView(registry)
        waited_s, routable_s, during, _ = library_change(router, view, n)
        router.config = dataclasses.replace(config, train_wait_seconds=0.0)
        waited0_s, routable0_s, during0, read_after_change_ms = library_change(router, view, n + 1)
        return {"skills": n, "upload_per_s": n / upload_s, "redis_bytes_per_skill": memory / n,
                "router_bytes_per_skill": router_bytes / n, "encode_texts_per_s": rate, "texts": 4 * n,
                "list_all_ms": list_all_ms, "list_page_100_ms": page_ms,
                "read_after_change_ms": read_after_change_ms, "full_reads": view.full_reads, "cold_start_s": cold_start_s,
                "first_training_s": first_training_s, "network": n <= config.lr_max_skills,
                "route_p50_ms": statistics.median(times), "route_p95_ms": percentile(times, 95), "route_p99_ms": p99,
                "encode_p50_ms": statistics.median(encode), "torch_threads": torch.get_num_threads(),
                "held_out_accuracy": hits / len(picks), "held_out_leads": leads / len(picks),
                "held_out_nearest": nearest / len(picks), "prompts": len(picks),
                "waited_after_change_s": waited_s, "new_skill_routable_s": routable_s,
                "requests_during_change": len(during),
                "waited_after_change_wait0_s": waited0_s, "new_skill_routable_wait0_s": routable0_s,
                "train_wait_setting_s": config.train_wait_seconds, "top_k": config.top_k,
                "lr_max_skills": config.lr_max_skills, "temperature": config.temperature}
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])


def _routable(seconds: float | None) -> str:
    return f"{seconds:.2f}" if seconds is not None else "not in 120 s"


def report_md(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = ["# The library at scale", "",
             "Generated by `python -m bench.scale`: tiny synthetic skills (rank 1, one module, three example prompts "
             "and a description around a keyword only that skill uses) in the real Redis; the real router (MiniLM, "
             f"retrieve-then-compose: α among the top {r0['top_k']} nearest skills, from the trained network up to "
             f"{r0['lr_max_skills']} skills, else a softmax of similarities at temperature {r0['temperature']:g}) in "
             f"process, on this machine's CPUs (torch threads: {r0['torch_threads']}; numpy's BLAS on one thread, as the "
             "router sets it: router/retrieval.py). Held-out prompts use another template around the same keyword.", "",
             "| skills | uploads/s | Redis bytes/skill (library + router) | list all (ms) | page of 100 (ms) "
             "| the library read after a change (ms) "
             "| α from | cold start: first answer (s) | first training (s) | route p50 / p95 / p99 (ms) | of which encoding the prompt, p50 (ms) "
             "| held-out: exactly its skill / led by it / its skill nearest | longest wait after a change (s) | new skill routable after (s) "
             "| same, wait 0: longest wait / routable (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['skills']:,} | {r['upload_per_s']:.0f} | {r['redis_bytes_per_skill']:,.0f} + "
                     f"{r['router_bytes_per_skill']:,.0f} | {r['list_all_ms']:.1f} | {r['list_page_100_ms']:.1f} | "
                     f"{r['read_after_change_ms']:.1f} | "
                     f"{'network' if r['network'] else 'similarity softmax'} | {r['cold_start_s']:.2f} | "
                     f"{r['first_training_s']:.2f} | {r['route_p50_ms']:.1f} / {r['route_p95_ms']:.1f} / "
                     f"{r['route_p99_ms']:.1f} | {r['encode_p50_ms']:.1f} | {r['held_out_accuracy']:.0%} / {r['held_out_leads']:.0%} / {r['held_out_nearest']:.0%} "
                     f"({r['prompts']}) | {r['waited_after_change_s']:.2f} | {_routable(r['new_skill_routable_s'])} | "
                     f"{r['waited_after_change_wait0_s']:.3f} / {_routable(r['new_skill_routable_wait0_s'])} |")
    lines += ["", "Encoding the profile texts with MiniLM is a one-time cost per text (cached in Redis by text for every "
              "replica and restart) and is not in the columns above: "
              + ", ".join(f"{r['texts']:,} texts ≈ {r['texts'] / r['encode_texts_per_s']:.0f} s" for r in rows)
              + f" at the {rows[-1]['encode_texts_per_s']:.0f} texts/s measured here when they were encoded "
              "(in a real library each upload's texts are encoded by the background rebuild that follows it).", "",
              "A request reads the library as the server does (adapter_store/library_view.py): the whole library once, "
              "then after each change only the skills the registry's change log names (*the library read after a "
              "change*, inside the waits below; before the change log, every request after a change read the whole "
              "library: *list all*).", "",
              f"A request after a library change waits at most `MOSAIC_ROUTER_TRAIN_WAIT_SECONDS` "
              f"({r0['train_wait_setting_s']:g} s here) for the rebuilt router, then the previous model answers (skills "
              "the library no longer has left out); the new skill is routable once the background rebuild ends. Above "
              f"{r0['lr_max_skills']} skills there is no fit: the rebuild reuses the previous index's rows and encodes "
              "only the new texts. With the wait at 0 no request waits for it at all.", "",
              "Held-out accuracy: *exactly its skill* is a one-skill plan naming the prompt's skill; *led by it* also "
              "counts compositions it leads; *its skill nearest* is retrieval's own top-1, whatever the plan. Prompts "
              "whose nearest skill is below `MOSAIC_ROUTER_OOD` (set on the demo skills) go to the base model: the "
              "made-up keywords keep these synthetic skills only weakly similar to their prompts.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts routed per size")
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
