"""Mosaic vs plain vLLM, both measured by vLLM's own benchmark client (``vllm.benchmarks.serve``, the
code behind ``vllm bench serve``): a random adapter per request (or the base model only), requests in
flight at once, random prompts, a fixed number of generated tokens (``--ignore-eos``).

    python -m bench.vllm_serve [--rounds 2] [--requests 48] [--concurrency 8] [--adapters 6] [--input-len 64] [--output-len 32]

Both servers run the same engine arguments (server.core.engine.vllm_cli_args) and the same demo adapters;
each gets one unmeasured warm-up pass over every adapter first. Writes bench/reports/vllm_serve.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench.harness import SKILLS, bench_env, drop_env, running_server

REPORTS = Path(__file__).resolve().parent / "reports"
KEEP = ("completed", "total_output_tokens", "duration", "request_throughput", "output_throughput",
        "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms")


def measure(url: str, model: str, tokenizer: str, loras: list[str], *, requests: int, concurrency: int,
            input_len: int, output_len: int, seed: int = 1) -> dict:
    """One run of vLLM's benchmark client against ``url``; its own metrics."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    argv = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(requests),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed), "--disable-tqdm"]
    if loras:
        argv += ["--lora-modules", *loras]
    result = serve.main(parser.parse_args(argv))
    return {k: result[k] for k in KEEP if k in result}


def _cases(url: str, base: str, tokenizer: str, skills: list[str], args) -> dict:
    kw = dict(requests=args.requests, concurrency=args.concurrency, input_len=args.input_len, output_len=args.output_len)
    measure(url, base, tokenizer, skills, **{**kw, "requests": 2 * len(skills)})  # warm-up: every adapter loaded once
    return {"adapters": measure(url, base, tokenizer, skills, **kw), "base": measure(url, base, tokenizer, [], **kw)}


def _plain(args, skills: list[str]) -> dict:
    from server.cli.launch import VLLM_SERVE, serving
    from server.core.engine import cpu_preload, vllm_cli_args
    from server.core.settings import Settings

    settings, env = Settings(), bench_env()
    base, model_dir = env["MOSAIC_BASE_MODEL_ID"], env["MOSAIC_BASE_MODEL"]
    argv = [*VLLM_SERVE, *vllm_cli_args(settings, Path(model_dir), base), "--port", "{port}",
            "--lora-modules", *(f"{s}={SKILLS / s}" for s in skills)]
    venv = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}
    if settings.preload and (preload := cpu_preload(venv)):  # as `mosaic serve` does: both servers alike
        venv["LD_PRELOAD"] = preload
    try:
        with serving(venv, Path(env["MOSAIC_DATA_DIR"]) / "vllm.log", argv=argv) as (url, _, _):
            return _cases(url, base, model_dir, skills, args)
    finally:
        drop_env(env)


def _mosaic(args, skills: list[str]) -> dict:
    with running_server() as (url, env, health):
        return _cases(url, health["base_model"], env["MOSAIC_BASE_MODEL"], skills, args)


def run(args) -> dict:
    """``args.rounds`` rounds, each a fresh plain vLLM server and a fresh Mosaic, in alternating order
    (vLLM first, then Mosaic first, ...) so that the machine's drift counts against both alike."""
    skills = sorted(p.name for p in SKILLS.iterdir())[: args.adapters]
    res: dict = {"config": {k: getattr(args, k) for k in ("requests", "concurrency", "adapters", "input_len", "output_len", "rounds")},
                 "skills": skills, "runs": {"mosaic": [], "vllm": []}}
    for i in range(args.rounds):
        order = ("vllm", "mosaic") if i % 2 == 0 else ("mosaic", "vllm")
        for server in order:
            res["runs"][server].append((_plain if server == "vllm" else _mosaic)(args, skills))
    for server, runs in res["runs"].items():  # the median run of each measure
        res[server] = {case: {k: statistics.median(r[case][k] for r in runs) for k in runs[0][case]} for case in ("adapters", "base")}
    res["ratios"] = {
        case: {"output_throughput": res["mosaic"][case]["output_throughput"] / res["vllm"][case]["output_throughput"],
               "median_ttft": res["mosaic"][case]["median_ttft_ms"] / res["vllm"][case]["median_ttft_ms"]}
        for case in ("adapters", "base")}
    res["ratios_per_round"] = [
        {case: round(m[case]["output_throughput"] / v[case]["output_throughput"], 3) for case in ("adapters", "base")}
        for m, v in zip(res["runs"]["mosaic"], res["runs"]["vllm"])]
    return res


def render(res: dict) -> str:
    c = res["config"]
    L = ["# Serving: Mosaic vs plain vLLM, measured by vLLM's own benchmark client", "",
         "Generated by `python -m bench.vllm_serve` on this machine (2 CPU cores, vLLM CPU engine). Both servers: the same "
         "engine arguments and the same demo adapters; `vllm.benchmarks.serve` (the code behind `vllm bench serve`) with "
         f"{c['requests']} requests, {c['concurrency']} in flight, random prompts of {c['input_len']} tokens, "
         f"{c['output_len']} generated tokens each (`--ignore-eos`); 'adapters' draws one of {len(res['skills'])} adapters "
         f"per request ({', '.join(res['skills'])}), 'base' uses the base model only. One warm-up pass first. "
         f"{c.get('rounds', 1)} round(s), each a fresh server of each kind, in alternating order; the table shows the median "
         "of each measure over the rounds.", "",
         "| case | server | completed | output tokens | output tok/s | median TTFT (ms) | p99 TTFT (ms) | median TPOT (ms) |",
         "|---|---|---|---|---|---|---|---|"]
    for case in ("adapters", "base"):
        for server in ("mosaic", "vllm"):
            r = res[server][case]
            L.append(f"| {case} | {'Mosaic' if server == 'mosaic' else 'plain vLLM'} | {r['completed']:.0f} | {r['total_output_tokens']:.0f} "
                     f"| {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.0f} |")
    L += ["", "| case | output throughput, Mosaic / vLLM (goal ≥ 0.97) | median TTFT, Mosaic / vLLM (goal ≤ 1.05) |", "|---|---|---|"]
    for case, r in res["ratios"].items():
        L.append(f"| {case} | {r['output_throughput']:.3f} | {r['median_ttft']:.3f} |")
    if per := res.get("ratios_per_round"):
        L += ["", "Output throughput ratio per round: " + "; ".join(
            f"round {i + 1}: adapters {r['adapters']:.3f}, base {r['base']:.3f}" for i, r in enumerate(per)) + "."]
    L += ["", *res.get("notes", [])]
    return "\n".join(L) + "\n"


def headline(res: dict) -> str:
    a, b = res["ratios"]["adapters"], res["ratios"]["base"]
    return (f"vs plain vLLM (vllm bench serve): throughput ×{a['output_throughput']:.2f} with adapters, "
            f"×{b['output_throughput']:.2f} base; median TTFT ×{a['median_ttft']:.2f} / ×{b['median_ttft']:.2f}")


def write(res: dict, name: str = "vllm_serve") -> None:
    (REPORTS / f"{name}.json").write_text(json.dumps(res, indent=2))
    (REPORTS / f"{name}.md").write_text(render(res))


def workload_args(doc: str) -> argparse.ArgumentParser:
    """The command line of a serving benchmark: the workload vllm.benchmarks.serve runs, and the rounds."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=6)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each condition, in alternating order (medians reported)")
    return ap


def main() -> None:
    res = run(workload_args(__doc__).parse_args())
    write(res)
    print(render(res))


if __name__ == "__main__":
    main()
