"""Section 8, vllm_serve: Mosaic vs plain vLLM measured by vLLM's own benchmark client (`vllm bench
serve`): a random adapter per request (and base only), 8 in flight, 48 requests (bench/vllm_serve.py,
which also writes vllm_serve.{json,md} after a full run)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> dict:
    from bench import vllm_serve

    ns = argparse.Namespace(requests=16 if args.quick else 48, concurrency=8, adapters=6, input_len=64,
                            output_len=16 if args.quick else 32, rounds=1 if args.quick else 2)
    res = vllm_serve.run(ns)
    if not args.quick:
        vllm_serve.write(res)
    return res


def render(vs: dict, quick: bool) -> tuple[list[str], list[str]]:
    from bench import vllm_serve

    title = "## 8. Serving under load: Mosaic vs plain vLLM"
    body = vllm_serve.render(vs).replace("# Serving: Mosaic vs plain vLLM", title, 1)
    return [body, ""], [f"| serving under load | {vllm_serve.headline(vs)} (goal ≥ 0.97 / ≤ 1.05) |"]
