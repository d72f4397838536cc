"""Section 9, ray_affinity: Mosaic replicas on Ray Serve, adapter loads and throughput with Ray's
multiplexed (adapter-affinity) routing vs the same replicas without it: 32 skills, 2 replicas of at most
4 adapters each, Zipf skill popularity (bench/ray_affinity.py, which also writes ray_affinity.{json,md}
after a full run)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> dict:
    from bench import ray_affinity

    ns = argparse.Namespace(requests=120 if args.quick else 500, concurrency=8, max_tokens=4)
    res = ray_affinity.run(ns)
    if not args.quick:
        ray_affinity.write(res)
    return res


def render(res: dict, quick: bool) -> tuple[list[str], list[str]]:
    from bench import ray_affinity

    title = "## 9. Replicas on Ray Serve: adapter affinity"
    body = ray_affinity.render(res).replace("# Adapter affinity on Ray Serve", title, 1)
    return [body, ""], [f"| Ray Serve, adapter affinity vs none | {res['load_ratio']}× fewer adapter loads, throughput × "
                        f"{res['throughput_ratio']} (goal ≥ 3×, > 1) |"]
