"""The bounded load test: 120 mixed requests on loopback while skills are uploaded and deleted
(``python -m bench.load`` runs 1000 for the report in bench/reports/load.md). 120 keep the suite's time:
the CI machine served 0.44 requests per second in this test (250 took about 9.5 minutes)."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from bench.load import report_md, run_load

pytestmark = pytest.mark.slow

REQUESTS = 120


def test_mixed_requests_while_the_library_churns(server):
    r = asyncio.run(run_load(server["url"], requests=REQUESTS, concurrency=16, pid=server["proc"].pid))
    print("\n" + report_md(r) + json.dumps(r, default=str), file=sys.stderr)
    assert r["requests"] == REQUESTS
    assert r["server_errors"] == 0, r["error_samples"]
    assert set(r["status"]) == {"200"}, r["status"]  # every request is valid: nothing else is acceptable either
    assert r["churn_rounds"] >= 3 and not r["churn_failures"]
    assert r["lost_or_corrupted"] == []
    assert r["rss_mb_after"] - r["rss_mb_before"] < 1024, r  # bounded: no per-request growth
