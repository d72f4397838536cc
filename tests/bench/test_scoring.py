"""The benchmark's scoring functions on known answers, and the report built from real (small) measurements."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.demo_data import SKILLS, examples, exact_match
from bench.scoring import markdown_table, mean_retention, percentile, ratio, retention, score


def test_exact_match_trims_whitespace_only():
    assert exact_match("  positive\n", "positive")
    assert not exact_match("Positive", "positive") and not exact_match("positive.", "positive")


def test_score_and_retention_on_known_answers():
    assert score(["a", "b ", "c", "x"], ["a", "b", "c", "d"]) == 0.75
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"])
    merged, own = {"s1": 0.5, "s2": 0.2, "s3": 0.4}, {"s1": 1.0, "s2": 0.4, "s3": 0.0}
    assert retention(merged, own) == {"s1": 0.5, "s2": 0.5}  # s3: the own adapter scores 0, left out
    assert mean_retention(merged, own) == 0.5
    assert math.isnan(mean_retention({"s": 1.0}, {"s": 0.0}))


def test_ratio_percentile_table():
    assert ratio(3.0, 4.0) == 0.75 and math.isnan(ratio(1.0, 0.0))
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 95) == 5 and percentile([1, 2, 3, 4, 5], 100) == 5
    assert markdown_table(["a", "b"], [[1, 0.12345]]) == ["| a | b |", "|---|---|", "| 1 | 0.123 |"]


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_demo_data_is_deterministic_with_disjoint_templates(skill):
    train, test = examples(skill, "train", 50), examples(skill, "test", 50)
    assert examples(skill, "test", 50) == test  # same seed, same data
    # the test templates are never trained on: no test prompt's wording (minus the payload) is a training one
    assert not {p for p, _ in test} & {p for p, _ in train}
    assert all(a.strip() for _, a in train + test)


def test_report_renders_from_real_registry_and_routing_measurements():
    from bench.run import render
    from bench.sections import registry, routing

    quick = argparse.Namespace(quick=True)
    res = {"date": "today", "machine": "test", "registry": registry.run(quick), "routing": routing.run(quick)}
    assert res["registry"]["ratio"] > 0 and res["registry"]["mib"] > 1
    md, section = render(res, quick=True)
    assert "## 5. Registry" in md and "## 2. Routing" in md and "Confusion" in md
    assert section.startswith("| measure | result |") and "registry throughput" in section


def test_scale_benchmark_measures_a_small_library_and_leaves_nothing(redis_client):
    from bench.scale import keyword, measure, report_md

    assert len({keyword(i) for i in range(5000)}) == 5000  # one made-up word per skill
    row = measure(redis_client, 6, prompts=3)
    assert row["skills"] == 6 and row["prompts"] == 3 and 0 <= row["held_out_accuracy"] <= 1
    assert row["list_page_100_ms"] > 0 and row["redis_bytes_per_skill"] > 0
    assert row["new_skill_routable_s"] is not None  # six distinct keywords: the new skill is found
    assert not list(redis_client.scan_iter(match="bench-scale-6-*"))
    assert "| 6 |" in report_md([row])
