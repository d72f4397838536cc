"""``mosaic skills``: the skill library (LoRA adapters in Redis): add, list, show, rm, export;
``train`` and ``compress`` have their own modules and are registered here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.cli.common import base_spec, fail, out, print_json, registry, settings
from server.cli.compress import compress
from server.cli.train import train

app = typer.Typer(help="The skill library (LoRA adapters in Redis).", no_args_is_help=True)


def _read_dir_meta(path: Path) -> dict:
    meta_file = path / "mosaic.json"
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def _read_examples_file(path: Path) -> list[str]:
    """One example prompt per line, or a JSON list of them."""
    if not path.exists():
        fail(f"{path} does not exist")
    text = path.read_text()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [str(x) for x in loaded] if isinstance(loaded, list) else [text.strip()]


def add(
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
    from adapter_store.validation import check_text, validate_files
    from server.edge.uploads import unpack

    if not directory.exists():
        fail(f"{directory} does not exist")
    if directory.is_dir():
        files = [(p.name, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file() and p.name != "mosaic.json"]
    else:
        files = [(directory.name, directory.read_bytes())]
    meta = _read_dir_meta(directory) if directory.is_dir() else {}
    examples = list(example or []) + (_read_examples_file(examples_file) if examples_file else [])
    examples = examples or list(meta.get("examples", []))
    description = description or meta.get("description", "")
    reg = registry()
    s = settings()  # the same limits as an upload over HTTP
    check_text(s.text_limits(), description=description, examples=examples, tags=tag or [])
    payload = unpack(files, s.max_upload_mb * 1024 * 1024)
    adapter = validate_files(payload, base_spec(), max_rank=s.max_adapter_rank, name=name, max_tensors=s.max_tensors)
    if if_changed and reg.exists(name) and reg.info(name).same_content(adapter):
        info = reg.info(name)
        message = f"{info.ref} unchanged"
    else:
        info = reg.add(name, adapter, description=description, examples=examples, tags=tag or [])
        message = f"stored [bold]{info.ref}[/] (rank {info.rank}, {info.size:,} bytes, sha256 {info.sha256[:12]}…)"
    if as_json:
        print_json(info.model_dump())
    else:
        out.print(message)


def list_(as_json: Annotated[bool, typer.Option("--json")] = False,
          limit: Annotated[int | None, typer.Option(min=1, help="at most this many skills")] = None,
          after: Annotated[str | None, typer.Option(help="the skills after this name, by name")] = None) -> None:
    """List the latest version of every skill, by name (a page of them with --limit and --after)."""
    infos = registry().list(after=after, limit=limit)
    if as_json:
        print_json([i.model_dump() for i in infos])
        return
    table = Table("name", "version", "rank", "modules", "size", "stored", "description")
    for i in infos:
        stored = f"{i.mos['bytes']:,} (shards)" if i.mos and i.mos.get("pool_version") else "exact"
        table.add_row(i.name, str(i.version), str(i.rank), ",".join(i.target_modules), f"{i.size:,}", stored,
                      i.description[:60])
    out.print(table if infos else "no skills yet: add one with `mosaic skills add DIR --name NAME`")


def show(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one skill (NAME or NAME@VERSION)."""
    reg = registry()
    info = reg.info(name)
    doc = {**info.model_dump(), "versions": [v.version for v in reg.versions(info.name)]}
    if as_json:
        print_json(doc)
        return
    table = Table(show_header=False)
    for k, v in doc.items():
        if k == "mos":
            k, v = "storage", _storage_line(info)
        if k == "composition" and v and v.get("quality"):
            table.add_row("quality", quality_line(info).removeprefix("; "))
        table.add_row(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    out.print(table)


def quality_line(info) -> str:
    """``; keeps a 90% (8 prompts), …``: a stored composition's quality report, or nothing."""
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


def rm(name: str) -> None:
    """Delete a skill (every version), or one version with NAME@VERSION."""
    gone = registry().delete(name)
    out.print("deleted " + ", ".join(g.ref for g in gone))


def export(name: str, directory: Path) -> None:
    """Write a skill as a PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    info, adapter = registry().load(name)
    adapter.save_dir(directory)
    out.print(f"wrote {info.ref} to {directory}/{{{CONFIG_FILE},{WEIGHTS_FILE}}}")


for _name, _command in (("add", add), ("train", train), ("list", list_), ("show", show), ("compress", compress),
                        ("rm", rm), ("export", export)):
    app.command(_name)(_command)
