"""Section 6, storage: the library (demo skills + variants) compressed to MoS shard pools at several pool
shapes: bytes in Redis, per-skill error, load time and exact match before/after (bench/storage.py, which
also writes storage[_quick].{json,md,png})."""

from __future__ import annotations

import argparse

from bench.sections import suffix


def run(args: argparse.Namespace) -> dict:
    from bench import storage

    res = storage.run(args.quick, n=5 if args.quick else 20)
    storage.write(res)
    return res


def render(st: dict, quick: bool) -> tuple[list[str], list[str]]:
    from bench import storage

    best = storage.best_at_one_point(st)
    headline = (f"| storage, {st['skills']} skills as MoS shards | "
                + (f"{best['ratio']:.1f}× fewer bytes in Redis at "
                   f"{100 * (best['exact_match_mean'] - st['baseline']['exact_match_mean']):+.1f} points exact match "
                   "(goal ≥ 4× at ≤ 1 point loss) |" if best else "no configuration within 1 point |"))
    return [storage.render(st).replace("storage.png", f"storage{suffix(quick)}.png"), ""], [headline]
