"""Section 4, serving: tokens/s and time to first token through Mosaic vs a plain ``vllm serve`` with the
same engine settings, prompt and adapters: base, a skill, a composition (first request and cached), auto."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.scoring import markdown_table, ratio
from bench.sections import SKILLS, suffix

PROMPT = "Write a short story about a robot who learns to paint. Use at least five sentences."
FIRST = {"skill (first request: adapter load)", "composition (first request: compose + load)"}  # measured once


def _stream(url: str, body: dict) -> dict:
    """One streamed chat request: time to first token, total time, completion tokens."""
    t0 = time.perf_counter()
    ttft, tokens, mosaic = None, 0, None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            mosaic = mosaic or chunk.get("mosaic")
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"ttft_s": ttft, "seconds": total, "tokens": tokens, "tokens_per_s": tokens / total, "mosaic": mosaic}


def _cases(url: str, model_of: dict, requests: int, max_tokens: int) -> dict:
    out = {}
    for case, extra in model_of.items():
        body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": max_tokens,
                "ignore_eos": True, **extra}
        n = 1 if case in FIRST else requests
        out[case] = [_stream(url, body) for _ in range(n)]
    return out


def _summary(runs: list[dict]) -> dict:
    return {"requests": len(runs), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs if r["ttft_s"] is not None)}


def run(args: argparse.Namespace) -> dict:
    from bench.harness import running_server
    from composer import compose
    from lora.adapter import LoraAdapter
    from server.cli.launch import VLLM_SERVE
    from server.cli.launch import serving as launch
    from server.core.settings import Settings

    requests, max_tokens = (1, 16) if args.quick else (3, 64)
    skill, pair = "json_extract", ["json_extract", "sentiment"]
    comp = {"skills": pair, "weights": [1.0, 0.5]}
    res: dict = {"requests": requests, "max_tokens": max_tokens}
    with running_server() as (url, env, health):
        base_id = health["base_model"]
        auto_prompt_plan = httpx.post(f"{url}/v1/route", json={"prompt": PROMPT}, timeout=60).json()
        _stream(url, {"model": base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # warm-up
        cases = {"base": {"model": base_id}, "skill (first request: adapter load)": {"model": skill},
                 "skill": {"model": skill}, "composition (first request: compose + load)": {"model": base_id, "composition": comp},
                 "composition (cached)": {"model": base_id, "composition": comp}, "auto": {"model": "auto"}}
        res["mosaic"] = _cases(url, cases, requests, max_tokens)
        res["auto_plan"] = auto_prompt_plan
        res["mosaic_engine_start_s"] = health.get("engine_start_seconds")
    # the same engine settings, adapters and prompt through a plain `vllm serve`
    s = Settings()
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    merged, _ = compose([LoraAdapter.from_dir(SKILLS / x) for x in pair], [1.0, 0.5], method="linear")
    merged.save_dir(work / "composition")
    plan_skill = auto_prompt_plan.get("skill") if auto_prompt_plan.get("kind") == "skill" else None
    modules = [f"{skill}={SKILLS / skill}", f"composition={work / 'composition'}"]
    if plan_skill and plan_skill != skill:
        modules.append(f"{plan_skill}={SKILLS / plan_skill}")
    argv = [*VLLM_SERVE, "--model", env["MOSAIC_BASE_MODEL"], "--port", "{port}",
            "--served-model-name", base_id, "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
            "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.max_cpu_loras), "--max-model-len", str(s.max_model_len),
            "--dtype", s.dtype, "--enforce-eager", "--lora-modules", *modules]
    venv = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib)}
    with launch(venv, work / "vllm.log", argv=argv) as (url, _, ready_s):
        _stream(url, {"model": base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        auto_equiv = {"model": plan_skill} if plan_skill else {"model": base_id}
        cases = {"base": {"model": base_id}, "skill (first request: adapter load)": {"model": skill}, "skill": {"model": skill},
                 "composition (first request: compose + load)": {"model": "composition"},
                 "composition (cached)": {"model": "composition"}, "auto": auto_equiv}
        res["vllm"] = _cases(url, cases, requests, max_tokens)
        res["vllm_ready_s"] = ready_s
    res["table"] = []
    for case in res["mosaic"]:
        m, v = _summary(res["mosaic"][case]), _summary(res["vllm"][case])
        res["table"].append({"case": case, "mosaic": m, "vllm": v, "tps_ratio": ratio(m["tokens_per_s"], v["tokens_per_s"]),
                             "ttft_ratio": ratio(m["ttft_s"], v["ttft_s"])})
    steady = [r["tps_ratio"] for r in res["table"] if "first" not in r["case"]]
    res["steady_tps_ratio_mean"] = statistics.mean(steady)
    return res


def render(s: dict, quick: bool) -> tuple[list[str], list[str]]:
    L = ["## 4. Serving: Mosaic vs plain vLLM", "",
         f"One request at a time, streamed, {s['max_tokens']} tokens each (ignore_eos), median of {s['requests']}; "
         "the same engine settings, prompt and adapter folders through `mosaic serve` and a plain `vllm serve` "
         "(`--lora-modules`). 'auto' on plain vLLM is the skill Mosaic's router chose "
         f"({s['auto_plan'].get('kind')} {s['auto_plan'].get('skill') or ''}).", "", f"![serving](serving{suffix(quick)}.png)", "",
         *markdown_table(["case", "Mosaic tok/s", "vLLM tok/s", "ratio", "Mosaic TTFT s", "vLLM TTFT s", "TTFT ratio"], [
             [t["case"], t["mosaic"]["tokens_per_s"], t["vllm"]["tokens_per_s"], t["tps_ratio"], t["mosaic"]["ttft_s"],
              t["vllm"]["ttft_s"], t["ttft_ratio"]] for t in s["table"]]),
         "", f"**Mosaic / vLLM tokens/s (steady-state cases): {s['steady_tps_ratio_mean']:.3f}** (goal ≥ 0.95: "
         f"{'met' if s['steady_tps_ratio_mean'] >= 0.95 else 'NOT met'}).", ""]
    return L, [f"| serving tokens/s, Mosaic / plain vLLM | {s['steady_tps_ratio_mean']:.2f} (goal ≥ 0.95) |"]


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r["case"] for r in s["table"]]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [r["mosaic"]["tokens_per_s"] for r in s["table"]], 0.4, label="Mosaic")
    ax.bar([i + 0.2 for i in x], [r["vllm"]["tokens_per_s"] for r in s["table"]], 0.4, label="plain vLLM")
    ax.set_xticks(list(x), [c.replace(" (", "\n(") for c in cases], fontsize=7)
    ax.set_ylabel("tokens/s (one request at a time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
