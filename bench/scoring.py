"""The report's arithmetic, kept apart so it is unit-tested on known answers (tests/bench)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from bench.demo_data import exact_match


def score(outputs: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of exact matches (after trimming whitespace)."""
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs for {len(answers)} answers")
    return sum(exact_match(o, a) for o, a in zip(outputs, answers)) / len(answers) if answers else 0.0


def retention(merged: Mapping[str, float], own: Mapping[str, float]) -> dict[str, float]:
    """Per skill, merged score / own score; skills the own adapter never gets right are left out."""
    return {s: merged[s] / own[s] for s in merged if own.get(s, 0) > 0}


def mean_retention(merged: Mapping[str, float], own: Mapping[str, float]) -> float:
    r = retention(merged, own)
    return statistics.mean(r.values()) if r else float("nan")


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs (nan when theirs is 0)."""
    return ours / theirs if theirs else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
