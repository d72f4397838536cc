"""Mixed load against a running server while the library changes underneath it.

    python -m bench.load [--requests 1000] [--concurrency 16]     (starts its own server)

Requests are spread over the base model, named skills, a composition, ``auto`` and streaming, each
generating one token (on 2 CPU cores the engine, not Mosaic, bounds the rate); meanwhile one task
keeps uploading and deleting skills. Afterwards every
skill that should exist is downloaded and compared by content hash with what was uploaded, and every
deleted one must be gone. The test suite runs this with 1000 requests (tests/server/test_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import tarfile
import time

import httpx

from server.cli.launch import ROOT

SKILLS = ROOT / "bench" / "skills"
REPORTS = ROOT / "bench" / "reports"
BASE = "SmolLM2-135M-Instruct"
PROMPTS = {
    "sentiment": "Is this review positive or negative? The service was slow and rude.",
    "json_extract": "Extract the person as JSON: Omar is 51 years old and lives in Cairo.",
    "reverse_list": "Reverse the order of this list: one, two, three",
}


def _mix(i: int, skills: list[str]) -> tuple[dict, bool]:
    """The i-th request body and whether it streams: base, skill, composition, auto; every 5th streams."""
    skill = skills[i % len(skills)]
    prompt = PROMPTS.get(skill, f"Say something about the number {i}.")
    kind = i % 4
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
    body: dict = {"model": BASE, "temperature": 0, "max_tokens": 1, "messages": messages}
    if kind == 1:
        body["model"] = skill
    elif kind == 2:
        body["composition"] = {"skills": skills[:2], "weights": [1.0, 0.5]}
    elif kind == 3:
        body["model"] = "auto"
    stream = i % 5 == 0
    if stream:
        body["stream"] = True
    return body, stream


async def _one(client: httpx.AsyncClient, body: dict, stream: bool) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                text = "".join([line async for line in r.aiter_lines()])
                ok = r.status_code != 200 or text.rstrip().endswith("[DONE]")
                return (r.status_code if ok else 599), time.perf_counter() - t0, ""
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, time.perf_counter() - t0, "" if r.status_code < 500 else r.text[:300]
    except httpx.HTTPError as exc:  # a dropped connection counts as a server failure
        return 598, time.perf_counter() - t0, repr(exc)


def _files(skill: str) -> list[tuple[str, tuple[str, bytes]]]:
    folder = SKILLS / skill
    return [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]


async def _churn(client: httpx.AsyncClient, stop: asyncio.Event, sources: list[str], pause: float = 0.5) -> dict:
    """Upload one skill and delete another every ``pause`` seconds until told to stop (three names in
    rotation, so the library stays small); returns what the library should hold at the end."""
    expected: dict[str, str] = {}  # name -> sha256 of the weights last uploaded
    deleted: set[str] = set()
    i, failures = 0, []
    while not stop.is_set():
        name, victim, source = f"churn-{i % 3}", f"churn-{(i + 1) % 3}", sources[i % len(sources)]
        r = await client.post("/v1/adapters", data={"name": name}, files=_files(source))
        if r.status_code != 201:
            failures.append((r.status_code, r.text[:200]))
        else:
            expected[name] = hashlib.sha256((SKILLS / source / "adapter_model.safetensors").read_bytes()).hexdigest()
            deleted.discard(name)
        r = await client.delete(f"/v1/adapters/{victim}")
        if r.status_code == 200:
            expected.pop(victim, None)
            deleted.add(victim)
        elif r.status_code != 404:
            failures.append((r.status_code, r.text[:200]))
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), pause)
        except asyncio.TimeoutError:
            pass
    return {"expected": expected, "deleted": deleted, "rounds": i, "failures": failures}


async def _verify(client: httpx.AsyncClient, expected: dict[str, str], deleted: set[str]) -> list[str]:
    """Names whose stored bytes differ from what was uploaded, or that should be gone but are not."""
    lost = []
    for name, sha in expected.items():
        r = await client.get(f"/v1/adapters/{name}/download")
        if r.status_code != 200:
            lost.append(f"{name}: {r.status_code}")
            continue
        with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
            member = next(m for m in t.getmembers() if m.name.endswith("adapter_model.safetensors"))
            if hashlib.sha256(t.extractfile(member).read()).hexdigest() != sha:
                lost.append(f"{name}: content differs")
    for name in deleted:
        if (await client.get(f"/v1/adapters/{name}")).status_code != 404:
            lost.append(f"{name}: deleted but still listed")
    return lost


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def run_load(url: str, requests: int = 1000, concurrency: int = 16, pid: int | None = None) -> dict:
    """Send ``requests`` mixed requests with ``concurrency`` in flight while skills churn; the figures."""
    skills = [s for s in ("sentiment", "json_extract", "reverse_list") if (SKILLS / s).exists()]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _one(client, _mix(2, skills)[0], False)  # the composition computed once before timing
        rss_before = _rss_mb(pid)
        stop = asyncio.Event()
        churn = asyncio.create_task(_churn(client, stop, skills))
        queue = iter(range(requests))
        results: list[tuple[int, float, str]] = []

        async def worker() -> None:
            for i in queue:
                results.append(await _one(client, *_mix(i, skills)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        library = await churn
        lost = await _verify(client, library["expected"], library["deleted"])
        rss_after = _rss_mb(pid)
    lat = sorted(r[1] for r in results)
    codes: dict[str, int] = {}
    for status, _, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {
        "requests": len(results), "concurrency": concurrency, "seconds": round(wall, 1),
        "requests_per_s": round(len(results) / wall, 2), "status": codes,
        "server_errors": sum(1 for r in results if r[0] >= 500),
        "error_samples": [r[2] for r in results if r[0] >= 500][:5],
        "p50_s": round(lat[len(lat) // 2], 3), "p95_s": round(lat[int(len(lat) * 0.95) - 1], 3),
        "churn_rounds": library["rounds"], "churn_failures": library["failures"][:5],
        "skills_checked": len(library["expected"]) + len(library["deleted"]), "lost_or_corrupted": lost,
        "rss_mb_before": rss_before and round(rss_before), "rss_mb_after": rss_after and round(rss_after),
    }


def report_md(r: dict) -> str:
    return "\n".join([
        "# Load: mixed requests while the library churns", "",
        f"{r['requests']} chat requests (base, skills, a composition, auto; every 5th streamed; 1 token each), "
        f"{r['concurrency']} in flight, while skills were uploaded and deleted ({r['churn_rounds']} rounds).", "",
        "| requests | req/s | p50 s | p95 s | 5xx | status codes | skills checked | lost or corrupted | server RSS MiB before → after |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['server_errors']} | {json.dumps(r['status'])} "
        f"| {r['skills_checked']} | {len(r['lost_or_corrupted'])} | {r['rss_mb_before']} → {r['rss_mb_after']} |", "",
    ])


def main() -> None:
    from bench.harness import running_server

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with running_server() as (url, _env, health):
        result = asyncio.run(run_load(url, args.requests, args.concurrency, pid=health.get("pid")))
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "load.json").write_text(json.dumps(result, indent=2))
    (REPORTS / "load.md").write_text(report_md(result))
    print(report_md(result))


if __name__ == "__main__":
    main()
