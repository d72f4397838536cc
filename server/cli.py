"""The ``mosaic`` command line: a thin layer over the functions the server uses."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter_store.adapter import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.errors import MosaicError

app = typer.Typer(help="Mosaic: a LoRA adapter composition server.", no_args_is_help=True, pretty_exceptions_enable=False)
skills_app = typer.Typer(help="The skill library (LoRA adapters in Redis).", no_args_is_help=True)
base_app = typer.Typer(help="The base model.", no_args_is_help=True)
app.add_typer(skills_app, name="skills")
app.add_typer(base_app, name="base")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _settings():
    from server.settings import get_settings

    return get_settings()


def _registry():
    from server.state import open_registry

    try:
        return open_registry(_settings())
    except MosaicError as exc:
        _fail(str(exc))


def _spec():
    from adapter_store.validation import BaseModelSpec
    from server.base_model import base_model_id, prepare

    s = _settings()
    return BaseModelSpec.from_dir(prepare(s), model_id=base_model_id(s))


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
) -> None:
    """Run the OpenAI-compatible server (the engine starts in the background; /health says when ready)."""
    import logging

    from server.auth import is_loopback
    from server.engine import cpu_preload

    settings = _settings()
    if not is_loopback(host) and not (settings.api_key or settings.open_admin or _keys_locked(settings)):
        _fail(f"refusing to serve on {host}: the server has no API key, so anyone who can reach it could change "
              "and read the library. Set MOSAIC_API_KEY (or create a key: `mosaic keys create NAME --scope admin`), "
              "or set MOSAIC_OPEN_ADMIN=true if that is what you want; on 127.0.0.1 no key is needed", 2)
    if settings.engine == "vllm" and settings.preload and (preload := cpu_preload(dict(os.environ))):
        # the loader reads LD_PRELOAD when a process starts: start again, the same command, with it
        # (MOSAIC_PRELOAD=false: don't)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "LD_PRELOAD": preload})
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def _keys_locked(settings) -> bool:
    from adapter_store.keys import KeyStore
    from server.state import open_registry

    try:
        return KeyStore(open_registry(settings).r, settings.redis_prefix).locked()
    except MosaicError:
        return False


@base_app.command("prepare")
def base_prepare() -> None:
    """Prepare the base model (converts the bundled GGUF once) and print its folder."""
    from server.base_model import prepare

    try:
        path = prepare(_settings(), quiet=False)
    except FileNotFoundError as exc:
        _fail(str(exc))
    print(path)


def _read_dir_meta(path: Path) -> dict:
    meta_file = path / "mosaic.json"
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


@skills_app.command("add")
def skills_add(
    directory: Annotated[Path, typer.Argument(help="a PEFT adapter folder or a .tar.gz/.zip of one")],
    name: Annotated[str, typer.Option("--name", help="the skill's name")],
    description: Annotated[Optional[str], typer.Option(help="what the skill does (used for routing)")] = None,
    example: Annotated[Optional[list[str]], typer.Option("--example", help="an example prompt (repeatable)")] = None,
    examples_file: Annotated[Optional[Path], typer.Option(help="a file with one example prompt per line, or a JSON list")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="a tag (repeatable)")] = None,
    if_changed: Annotated[bool, typer.Option(help="do nothing if the latest version has the same weights and ΔW-relevant config")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate an adapter and store it as the next version of NAME."""
    from adapter_store.validation import validate_files
    from server.uploads import unpack

    if not directory.exists():
        _fail(f"{directory} does not exist")
    if directory.is_dir():
        files = [(p.name, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file() and p.name != "mosaic.json"]
    else:
        files = [(directory.name, directory.read_bytes())]
    meta = _read_dir_meta(directory) if directory.is_dir() else {}
    examples = list(example or [])
    if examples_file:
        if not examples_file.exists():
            _fail(f"{examples_file} does not exist")
        text = examples_file.read_text()
        try:
            loaded = json.loads(text)
            examples += [str(x) for x in loaded] if isinstance(loaded, list) else [text.strip()]
        except json.JSONDecodeError:
            examples += [line.strip() for line in text.splitlines() if line.strip()]
    examples = examples or list(meta.get("examples", []))
    reg = _registry()
    settings = _settings()
    try:
        payload = unpack(files, settings.max_upload_mb * 1024 * 1024)
        adapter = validate_files(payload, _spec(), max_rank=settings.max_adapter_rank, name=name)
        if if_changed and reg.exists(name) and reg.info(name).same_content(adapter):
            info = reg.info(name)
            if not as_json:
                out.print(f"{info.ref} unchanged")
        else:
            info = reg.add(name, adapter, description=description or meta.get("description", ""), examples=examples, tags=tag or [])
            if not as_json:
                out.print(f"stored [bold]{info.ref}[/] (rank {info.rank}, {info.size:,} bytes, sha256 {info.sha256[:12]}…)")
    except MosaicError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(info.model_dump())


@skills_app.command("train")
def skills_train(
    data: Annotated[Path, typer.Argument(help="JSONL: {\"messages\": [...]} or {\"prompt\", \"completion\"} per line")],
    name: Annotated[str, typer.Option("--name", help="the new skill's name")],
    description: Annotated[Optional[str], typer.Option(help="what the skill does (default: from the data)")] = None,
    rank: Annotated[int, typer.Option(min=1, max=256)] = 8,
    alpha: Annotated[int, typer.Option(min=1)] = 16,
    targets: Annotated[str, typer.Option(help="comma-separated target modules")] = "q_proj,k_proj,v_proj,o_proj",
    steps: Annotated[int, typer.Option(min=1)] = 40,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-3,
    batch: Annotated[int, typer.Option(min=1)] = 8,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="held out for the exact-match check")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="refuse examples longer than this (tokens)")] = 512,
    init_from: Annotated[Optional[str], typer.Option(help="start from a composition of these skills (comma-separated, PSEC reuse)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train a new LoRA skill on the base model from chat examples and register it."""
    import random

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer

    from adapter_store.validation import check_name, validate_adapter
    from server.base_model import base_model_id, prepare
    from server.training import greedy_answers, train_lora
    from server.training_data import read_jsonl

    if problems := check_name(name):
        _fail("; ".join(problems), 2)
    settings = _settings()
    reg = _registry()
    base = prepare(settings, quiet=True)
    try:
        examples = read_jsonl(data, AutoTokenizer.from_pretrained(base), max_tokens)
    except MosaicError as exc:
        _fail(str(exc))
    rng = random.Random(seed)
    shuffled = examples[:]
    rng.shuffle(shuffled)
    n_val = int(len(shuffled) * val_fraction) if len(shuffled) >= 10 else 0
    val, train = shuffled[:n_val], shuffled[n_val:]
    init = None
    if init_from:
        from server.training import init_from_skills

        try:
            parts = [reg.load(s.strip())[1] for s in init_from.split(",") if s.strip()]
        except MosaicError as exc:
            _fail(str(exc))
        init = init_from_skills(parts, rank)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, disable=as_json) as bar:
        task = bar.add_task(f"training {name}", total=steps)
        adapter = train_lora(
            base, [(e.messages, e.answer) for e in train], rank=rank, alpha=alpha,
            targets=[t.strip() for t in targets.split(",") if t.strip()], steps=steps, lr=lr, batch=batch, seed=seed,
            base_model_id=base_model_id(settings), init=init,
            on_step=lambda s, loss: bar.update(task, completed=s + 1, description=f"training {name} (loss {loss:.3f})"),
        )
    spec = _spec()
    try:
        validate_adapter(adapter, spec, max_rank=settings.max_adapter_rank, name=name)
    except MosaicError as exc:
        _fail(str(exc))
    score = None
    if val:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_dir(tmp)
            answers = greedy_answers(base, tmp, [e.messages for e in val], max_new_tokens=64)
        score = sum(a.strip() == e.answer.strip() for a, e in zip(answers, val)) / len(val)
    prompts = [e.prompt for e in examples]
    info = reg.add(name, adapter, description=description or f"Trained on {data.name}: e.g. {prompts[0][:80]}",
                   examples=prompts[:8], tags=["trained"])
    result = {**info.model_dump(), "train_examples": len(train), "val_examples": len(val), "val_exact_match": score,
              "init_from": init_from}
    if as_json:
        _print_json(result)
    else:
        out.print(f"stored [bold]{info.ref}[/] (rank {rank}, {len(train)} examples, {steps} steps); "
                  + (f"validation exact match {score:.1%} on {len(val)}" if score is not None else "no validation split"))


@skills_app.command("list")
def skills_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the latest version of every skill."""
    infos = _registry().list()
    if as_json:
        _print_json([i.model_dump() for i in infos])
        return
    table = Table("name", "version", "rank", "modules", "size", "stored", "description")
    for i in infos:
        stored = f"{i.mos['bytes']:,} (shards)" if i.mos and i.mos.get("pool_version") else "exact"
        table.add_row(i.name, str(i.version), str(i.rank), ",".join(i.target_modules), f"{i.size:,}", stored,
                      i.description[:60])
    out.print(table if infos else "no skills yet: add one with `mosaic skills add DIR --name NAME`")


@skills_app.command("show")
def skills_show(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one skill (NAME or NAME@VERSION)."""
    reg = _registry()
    try:
        info = reg.info(name)
        versions = [v.version for v in reg.versions(info.name)]
    except MosaicError as exc:
        _fail(str(exc))
    doc = {**info.model_dump(), "versions": versions}
    if as_json:
        _print_json(doc)
        return
    table = Table(show_header=False)
    for k, v in doc.items():
        if k == "mos":
            k, v = "storage", _storage_line(info)
        if k == "composition" and v and v.get("quality"):
            table.add_row("quality", _quality_line(info).removeprefix("; "))
        table.add_row(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    out.print(table)


def _quality_line(info) -> str:
    q = (info.composition or {}).get("quality")
    if not q:
        return ""
    return "; keeps " + ", ".join(
        f"{s['skill']} {s['agreement']:.0%} ({s['prompts']} prompts)" if s["agreement"] is not None else f"{s['skill']} (no examples)"
        for s in q["skills"])


def _storage_line(info) -> str:
    m = info.mos
    if not m:
        return "exact"
    if m.get("pool_version") is None:
        return f"exact ({m.get('note', 'stored exact')})" + (f", error {m['error']:.4f}" if m.get("error") else "")
    return (f"MoS shards (pools v{m['pool_version']}): {m['bytes']:,} bytes "
            f"({info.size / max(1, m['bytes']):.1f}× smaller), relative error {m['error']:.4f}, "
            f"{m.get('private', 0):.1%} of shards private")


@skills_app.command("compress")
def skills_compress(
    shard_width: Annotated[int, typer.Option(min=1, help="values per shard")] = 4,
    shards_per_vector: Annotated[Optional[int], typer.Option(
        min=1, help="MoS's l: cut each vector in l shards (instead of --shard-width)")] = None,
    pool_size: Annotated[int, typer.Option(
        min=2, max=65536, help="shards per pool (one pool per projection and A/B)")] = 256,
    error_budget: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="largest relative ‖ΔW − ΔŴ‖_F per skill (0 < e < 1)")] = 0.35,
    max_private: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="largest share of a skill's shards stored privately")] = 0.5,
    keep_originals: Annotated[bool, typer.Option(
        "--keep-originals", help="keep the uploaded weights beside the shards")] = False,
    off: Annotated[bool, typer.Option("--off", help="store every skill exact again and stop encoding uploads")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Store the library as MoS shard pools plus per-skill index tables (or refresh the pools).

    Uploads from then on are encoded against the pools; a skill that cannot meet the error budget stays
    exact. Safe while the server runs: each skill moves in its own transaction."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from adapter_store.compression import CompressOptions, compress_library, decompress_library

    reg = _registry()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        try:
            options = CompressOptions(shard_width=shard_width, shards_per_vector=shards_per_vector,
                                      pool_size=pool_size, error_budget=error_budget, max_private=max_private,
                                      keep_originals=keep_originals, seed=seed)
        except ValidationError as exc:
            _fail("Invalid value: " + "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                                for e in exc.errors()), 2)
        try:
            if off:
                changed = decompress_library(reg, progress)
            else:
                report = compress_library(reg, options, progress)
        except MosaicError as exc:
            _fail(str(exc))
    if off:
        if as_json:
            _print_json({"changed": changed})
        else:
            out.print(f"stored exact again: {changed} versions changed; uploads are stored exact from now on")
        return
    if as_json:
        _print_json({**report.model_dump(), "ratio": report.ratio})
        return
    shards = [r for r in report.versions if r["stored"] == "shards"]
    errors = [r["error"] for r in shards]
    table = Table("", "before", "after")
    table.add_row("weights in Redis", f"{report.bytes_before:,} bytes", f"{report.bytes_after:,} bytes"
                  f" ({report.ratio:.1f}× smaller; pools {report.pool_bytes:,})")
    table.add_row("versions", str(len(report.versions)),
                  f"{len(shards)} in shards, {len(report.versions) - len(shards)} exact (over budget)")
    if errors:
        table.add_row("relative error", "0", f"mean {sum(errors) / len(errors):.3f}, max {max(errors):.3f}"
                      f" (budget {report.options.error_budget:g})")
    out.print(table)
    out.print(f"pools v{report.pool_version} in {report.seconds:.1f} s"
              + (f"; collected old pools {report.collected_pools}" if report.collected_pools else ""))


@skills_app.command("rm")
def skills_rm(name: str) -> None:
    """Delete a skill (every version), or one version with NAME@VERSION."""
    try:
        gone = _registry().delete(name)
    except MosaicError as exc:
        _fail(str(exc))
    out.print("deleted " + ", ".join(g.ref for g in gone))


@skills_app.command("export")
def skills_export(name: str, directory: Path) -> None:
    """Write a skill as a PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    try:
        info, adapter = _registry().load(name)
    except MosaicError as exc:
        _fail(str(exc))
    adapter.save_dir(directory)
    out.print(f"wrote {info.ref} to {directory}/{{{CONFIG_FILE},{WEIGHTS_FILE}}}")


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--param takes KEY=VALUE, got {item!r}", 2)
        params[key] = value
    return params


def _read_examples(path: Path) -> list:
    """A JSON list, or JSON Lines, of {"prompt", "answer"} objects or prompt strings."""
    text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(value, list):
        raise ValueError("expected a JSON list or JSON Lines")
    return value


def _optimize(reg, comp, options, policy, settings):
    """LoraHub's search with a progress bar; returns the composition with the learned weights and the record."""
    import numpy as np
    from rich.progress import Progress

    from router.policy import routable
    from server.base_model import prepare
    from server.learned_weights import LossModel, optimize_composition, optimize_record

    def pick_for(template):
        skills = routable(reg.list())
        return lambda prompt: int(np.argmax(policy.route_within(prompt, template, skills, 0).alpha))

    with out.status("loading the base model for the weight search…"):
        model = LossModel(prepare(settings, quiet=True))
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("searching weights", total=options.budget)

        def progress(done, trial, best):
            bar.update(task, completed=done, description=f"best {best.objective:.3f} at {best.weights}")

        learned, result = optimize_composition(reg, comp, options, model, pick_for, max_rank=settings.max_adapter_rank,
                                               progress=progress)
    return learned, {"optimize": optimize_record(options, result)}


def _parse_weights(raw: str | None) -> tuple[float, ...] | str | None:
    if not raw:
        return None
    if raw.strip() == "auto":
        return "auto"
    try:
        return tuple(float(w) for w in raw.split(","))
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers or 'auto', got {raw!r}") from None


@app.command()
def compose(
    skills: Annotated[Optional[str], typer.Option(help="comma-separated skill names (name or name@version)")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="comma-separated weights, one per skill (default 1 each), or 'auto': chosen per prompt (with --name)")] = None,
    method: Annotated[str, typer.Option(help="merge method (see --list-methods)")] = "linear",
    rank: Annotated[Optional[str], typer.Option(help="target rank, or 'auto' (exact)")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="a method parameter KEY=VALUE (repeatable)")] = None,
    weighting: Annotated[str, typer.Option(help="'none' or 'varm' (per-module weights from each skill's ‖ΔW‖²)")] = "none",
    lines: Annotated[Optional[str], typer.Option(help="LiNeS 'ALPHA,BETA': scale layer l by ALPHA + BETA(l-1)/(L-1)")] = None,
    name: Annotated[Optional[str], typer.Option(help="store the result as this new skill")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="write the result as a PEFT folder here")] = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list the merge methods and exit")] = False,
    quality_prompts: Annotated[int, typer.Option(
        min=0, max=64, help="with --name: example prompts per input skill for the quality report (0: none)")] = 8,
    min_agreement: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="with --name: refuse to store if some input skill's own answer is kept on less than "
        "this share of its example prompts")] = None,
    optimize: Annotated[bool, typer.Option(
        "--optimize", help="with --name: learn the weights (LoraHub) from --optimize-examples, or from each skill's "
        "example prompts and its own answers")] = False,
    optimize_examples: Annotated[Optional[Path], typer.Option(
        help="JSON list or JSONL: {\"prompt\", \"answer\"} objects, or prompts alone")] = None,
    budget: Annotated[int, typer.Option(min=1, max=2000, help="--optimize: loss evaluations")] = 40,
    l1: Annotated[float, typer.Option(min=0.0, help="--optimize: λ of the L1 penalty on the weights")] = 0.05,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compose skills into one adapter, stored as a new skill (--name) or written to a folder (--out).

    A stored composition gets a quality report (agreement with each input skill's own greedy answers on
    its example prompts), computed here with the transformers reference engine."""
    from pydantic import ValidationError

    from composer import METHODS, Composition, compose as do_compose

    if list_methods:
        rows = [
            {"name": m.name, "space": m.space, "params": {k: f"{p.type.__name__}={p.default!r}: {p.help}" for k, p in m.params.items()},
             "reference": m.reference, "description": m.description}
            for m in METHODS.values()
        ]
        if as_json:
            _print_json(rows)
        else:
            table = Table("method", "space", "parameters", "reference")
            for r in rows:
                table.add_row(r["name"], r["space"], "; ".join(f"{k} ({v})" for k, v in r["params"].items()) or "-", r["reference"])
            out.print(table)
        return
    if not skills:
        _fail("--skills is required (e.g. --skills a,b)", 2)
    if (name is None) == (out_dir is None):
        _fail("give exactly one of --name NEW (store as a skill) or --out DIR (write a folder)", 2)
    try:
        comp = Composition(
            skills=tuple(s.strip() for s in skills.split(",") if s.strip()),
            weights=_parse_weights(weights),
            method=method, params=_parse_params(param or []), rank=rank, weighting=weighting,
            lines=tuple(float(x) for x in lines.split(",")) if lines else None,
        )
    except (ValidationError, ValueError) as exc:
        _fail(f"bad composition: {exc}", 2)
    if comp.context_aware and out_dir is not None:
        _fail("--weights auto chooses weights per prompt: store it with --name (a folder has fixed weights)", 2)
    if (optimize or optimize_examples) and (out_dir is not None or comp.context_aware):
        _fail("--optimize learns fixed weights for a stored skill: use it with --name and without --weights auto", 2)
    options = None
    if optimize or optimize_examples:
        from server.learned_weights import OptimizeOptions

        try:
            options = OptimizeOptions(examples=_read_examples(optimize_examples) if optimize_examples else [],
                                      budget=budget, l1=l1)
        except (ValidationError, ValueError, OSError) as exc:
            _fail(f"bad --optimize-examples: {exc}", 2)
    settings = _settings()
    reg = _registry()
    try:
        if name is not None:
            import asyncio

            from server.base_model import prepare
            from server.library import create_and_store
            from server.quality import reference_answerer
            from router.policy import routable
            from server.state import make_policy

            policy = make_policy(settings, reg)

            def weigh(c):
                async def plan(text: str):
                    skills = routable(reg.list())
                    return await asyncio.to_thread(policy.route_within, text, c, skills, reg.generation())
                return plan

            extra = None
            if options is not None:
                comp, extra = _optimize(reg, comp, options, policy, settings)
            with out.status("composing and measuring the quality report (reference engine)…"):
                info = asyncio.run(create_and_store(
                    reg, _spec(), comp, name, max_rank=settings.max_adapter_rank,
                    answer=reference_answerer(reg, prepare(settings, quiet=True), settings.max_adapter_rank),
                    weigh=weigh, engine="hf", quality_prompts=quality_prompts, min_agreement=min_agreement, extra=extra))
            result = info.model_dump()
            message = f"stored [bold]{info.ref}[/] (rank {info.rank})" + _quality_line(info)
        else:
            adapters = [reg.load(ref)[1] for ref in comp.skills]
            adapter, report = do_compose(adapters, **comp.compose_kwargs())
            adapter.save_dir(out_dir)
            result = {"out": str(out_dir), "rank": report.rank, "sha256": adapter.sha256()}
            message = f"wrote rank-{report.rank} adapter to {out_dir}"
    except MosaicError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(result)
    else:
        out.print(message)


router_app = typer.Typer(help="The router behind model=\"auto\".", no_args_is_help=True)
app.add_typer(router_app, name="router")


@app.command()
def route(text: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the router's decision for TEXT, without generating."""
    from server.state import make_policy

    reg = _registry()
    from router.policy import routable

    plan = make_policy(_settings(), reg).route(text, routable(reg.list()), reg.generation())
    if as_json:
        _print_json(plan.model_dump(mode="json"))
        return
    what = plan.skill if plan.kind == "skill" else (
        ", ".join(f"{w:g}×{s}" for s, w in zip(plan.composition.skills, plan.composition.weights)) if plan.composition else "")
    out.print(f"[bold]{plan.kind}[/] {escape(what)}  ({escape(plan.reason)})")
    table = Table("skill", "α", "similarity")
    for k, v in sorted(plan.scores.items(), key=lambda kv: -kv[1])[:8]:
        table.add_row(k, f"{v:.3f}", f"{plan.similarity.get(k, float('nan')):.3f}")
    if plan.scores:
        out.print(table)


@router_app.command("train")
def router_train() -> None:
    """Retrain the router on the current library now (it also retrains by itself when the library changes)."""
    from router.psec import PsecRouter

    reg = _registry()
    model = PsecRouter(reg).train(reg.list())
    out.print(f"trained on {len(model.names)} skills ({len(model.y)} profile texts) in {model.trained_seconds:.2f} s; "
              f"stored as {model.key}")


keys_app = typer.Typer(help="API keys (stored hashed in Redis).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _keys():
    from adapter_store.keys import KeyStore

    return KeyStore(_registry().r, prefix=_settings().redis_prefix)


@keys_app.command("create")
def keys_create(
    name: str,
    scope: Annotated[Optional[list[str]], typer.Option("--scope", help="admin, read and/or inference (repeatable; admin implies the others)")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="limit the key to skills named NAMESPACE/…")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    try:
        key, info = _keys().create(name, scope or ["inference"], namespace=namespace)
    except (ValueError, MosaicError) as exc:
        _fail(str(exc), 2)
    if as_json:
        _print_json({**info.model_dump(), "key": key})
    else:
        limited = f", skills named {info.namespace}/… only" if info.namespace else ""
        out.print(f"key {info.name} ({', '.join(info.scopes)}{limited}): [bold]{key}[/]\nstore it now: it cannot be shown again")


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (names, scopes, prefixes; never the keys)."""
    infos = _keys().list()
    if as_json:
        _print_json([i.model_dump() for i in infos])
        return
    table = Table("name", "scopes", "namespace", "prefix", "created")
    for i in infos:
        table.add_row(i.name, ",".join(i.scopes), i.namespace or "(all)", i.prefix + "…",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)))
    out.print(table if infos else "no keys: admin endpoints are open unless MOSAIC_API_KEY is set")


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke a key by name (effective on the next request, on every replica)."""
    try:
        info = _keys().revoke(name)
    except MosaicError as exc:
        _fail(str(exc))
    out.print(f"revoked {info.name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
