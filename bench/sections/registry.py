"""Section 5, registry: upload + fetch of a large adapter through the registry vs raw redis-py SET/GET of
the same bytes."""

from __future__ import annotations

import argparse
import statistics
import time

from bench.scoring import markdown_table, ratio


def run(args: argparse.Namespace) -> dict:
    import uuid

    import redis
    import torch

    from adapter_store.registry import Registry
    from lora.adapter import LoraAdapter, factor_key
    from server.core.settings import get_settings

    client = redis.Redis.from_url(get_settings().redis_url)
    prefix = f"mosaic-bench-{uuid.uuid4().hex[:8]}"
    layers = 4 if args.quick else 16
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
    reps = 3 if args.quick else 7
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


def render(g: dict, quick: bool) -> tuple[list[str], list[str]]:
    L = ["## 5. Registry", "", f"A {g['mib']:.0f} MiB adapter (bf16, rank 64 on 7B q/v shapes): `Registry.add` + `Registry.load` "
         "(safetensors, hashing, metadata, MULTI/EXEC) vs raw redis-py SET + GET of the same bytes; median of "
         f"{g['reps']}.", "", *markdown_table(["", "seconds (upload + fetch)", "MiB/s"], [
             ["Mosaic registry", g["mosaic_s"], g["mosaic_mib_s"]], ["raw redis-py", g["raw_s"], g["raw_mib_s"]]]),
         "", f"**Registry / raw: {g['ratio']:.2f}** (goal ≥ 0.5: {'met' if g['ratio'] >= 0.5 else 'NOT met'}).", ""]
    return L, [f"| registry throughput, Mosaic / raw redis-py | {g['ratio']:.2f} (goal ≥ 0.5) |"]
