"""Serving speed through Mosaic: engine start, and tokens/s for base, one skill, and a
composition (first request, which composes, and cached requests).

    python -m bench.serve_speed [--requests 5] [--max-tokens 64]

Starts its own server (real vLLM engine, real Redis under a bench key prefix, the demo skills),
sends sequential greedy requests, and writes bench/reports/serve_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "reports"
PROMPT = "Write a short story about a robot who learns to paint. Use at least five sentences."


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    prefix = f"mosaic-bench-{uuid.uuid4().hex[:8]}"
    data = tempfile.mkdtemp(prefix="mosaic-bench-")
    from server.base_model import base_model_id, prepare
    from server.settings import Settings

    settings = Settings()
    env = dict(os.environ, MOSAIC_REDIS_PREFIX=prefix, MOSAIC_DATA_DIR=data, MOSAIC_BASE_MODEL=str(prepare(settings)),
               MOSAIC_BASE_MODEL_ID=base_model_id(settings))
    skills = sorted(p.name for p in (ROOT / "bench" / "skills").iterdir())
    for s in skills:
        subprocess.run([sys.executable, "-m", "server.cli", "skills", "add", str(ROOT / "bench/skills" / s), "--name", s],
                       env=env, check=True, capture_output=True)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(data) / "server.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                h = httpx.get(f"{url}/health", timeout=2)
                if h.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 900:
                raise SystemExit("server failed to start; see " + log.name)
            time.sleep(0.5)
        start_total = time.monotonic() - t0
        engine_start = h.json()["engine_start_seconds"]

        def run(body: dict) -> dict:
            t = time.monotonic()
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            dt = time.monotonic() - t
            j = r.json()
            return {"seconds": dt, "tokens": j["usage"]["completion_tokens"], "cache": j["mosaic"].get("cache")}

        def body(**kw) -> dict:
            return {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": args.max_tokens, **kw}

        base_id = base_model_id(settings)
        run(body(model=base_id))  # warm-up
        rows = {}
        cases = {
            "base": body(model=base_id),
            f"skill ({skills[0]})": body(model=skills[0]),
        }
        for name, b in cases.items():
            if name.startswith("skill"):
                run(b)  # first use loads the adapter into the engine; measured separately below
            rows[name] = [run(b) for _ in range(args.requests)]
        comp = {"skills": skills, "weights": [1.0 / len(skills)] * len(skills)}
        first = run(body(model=base_id, composition=comp))
        rows[f"composition of {len(skills)} (first: compose + load)"] = [first]
        rows[f"composition of {len(skills)} (cached)"] = [run(body(model=base_id, composition=comp)) for _ in range(args.requests)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    table = []
    for name, rs in rows.items():
        toks = sum(r["tokens"] for r in rs)
        secs = sum(r["seconds"] for r in rs)
        table.append({"case": name, "requests": len(rs), "tokens_per_s": toks / secs,
                      "median_latency_s": statistics.median(r["seconds"] for r in rs), "cache": rs[-1]["cache"]})
    base_tps = table[0]["tokens_per_s"]
    lines = [
        "# Serving speed through Mosaic (vLLM CPU engine, sequential greedy requests)",
        "",
        f"Machine: {os.cpu_count()} cores. Engine start: {engine_start:.1f} s (server ready after {start_total:.1f} s).",
        f"{args.requests} requests per case, max_tokens={args.max_tokens}.",
        "",
        "| case | requests | tokens/s | vs base | median latency (s) | cache |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(f"| {t['case']} | {t['requests']} | {t['tokens_per_s']:.1f} | {t['tokens_per_s'] / base_tps:.2f} | "
                     f"{t['median_latency_s']:.2f} | {t['cache'] or '-'} |")
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "serve_speed.md").write_text("\n".join(lines) + "\n")
    (REPORTS / "serve_speed.json").write_text(json.dumps({"engine_start_s": engine_start, "ready_s": start_total, "rows": table}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
