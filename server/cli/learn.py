"""``mosaic compose --learn``: a composition learned from examples (server/jobs/learn_composition.py), run here as the
server runs its learn jobs (server/jobs/learn_api.py), with a progress bar per stage, then stored with its parents, fusion
weights and report (``store_learned``). The flags' help, defaults and bounds are :class:`LearnOptions`'."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from rich.table import Table

from lora.errors import InvalidRequestError
from server.cli.common import base_spec, err, fail, registry, settings
from server.jobs.learn_composition import LearnExample, LearnOptions


def described(model, field: str, what: str = "") -> str:
    """A flag's help: the model field's description and default (one source for the API and the CLI)."""
    info = model.model_fields[field]
    return f"{what}{info.description} (default {info.default})"


def check_arguments(learn: Path | None, *, out_dir: Path | None, optimize: bool, tuning: dict[str, object]) -> None:
    """Exit 2 on a flag that learning would not honour, before anything is read or loaded."""
    if learn is None:
        if given := [flag for flag, value in tuning.items() if value is not None and value is not False]:
            fail(f"{', '.join(given)} tune learning from examples: give --learn EXAMPLES.jsonl too", 2)
        return
    if out_dir is not None:
        fail("--learn stores the learned composition as a skill (its record keeps the parents and the report): "
             "use --name, not --out", 2)
    if optimize:
        fail("--optimize searches per-skill weights and --learn learns them by gradient: give one of the two", 2)
    if tuning.get("--expand-steps") is not None and tuning.get("--expand-rank") is None:
        fail("--expand-steps is the residual LoRA's: give --expand-rank too", 2)


def check_composition(comp, min_agreement: float | None, quality_prompts_given: bool) -> None:
    """The server's own refusals of a learn request (weights auto, a method other than exact linear, a quality
    report), as exit 2."""
    from server.jobs.learn_api import check_request

    try:
        check_request(comp, {"quality_prompts"} if quality_prompts_given else set(), min_agreement)
    except InvalidRequestError as exc:
        fail(f"--learn: {exc.message}", 2)


def read_examples(path: Path) -> list[LearnExample]:
    """One JSON object a line: ``{"prompt", "answer"}``, or a chat as ``mosaic skills train`` reads it
    (``{"messages": [...]}`` or ``{"prompt", "completion"}``) with one user turn before the answer. Every bad
    line is named (up to 20); raises InvalidRequestError."""
    from server.jobs.training_data import MAX_PROBLEMS

    examples, problems = [], []
    for i, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            examples.append(_example(json.loads(raw), i))
        except ValueError as exc:  # JSONDecodeError and ValidationError are ValueErrors
            problems.append(f"line {i}: {_why(exc)}")
            if len(problems) >= MAX_PROBLEMS:
                break
    if problems:
        raise InvalidRequestError(f"{path.name}: " + "; ".join(problems), param="learn")
    if not examples:
        raise InvalidRequestError(f"{path} holds no examples", param="learn")
    return examples


def _example(obj: object, line: int) -> LearnExample:
    from server.jobs.training_data import _parse

    if isinstance(obj, dict) and "messages" not in obj and "completion" not in obj:
        return LearnExample.model_validate(obj)
    chat = _parse(obj, line)
    if len(chat.messages) != 1:
        raise ValueError(f"a learning example is one user prompt and its answer; this chat has {len(chat.messages)} "
                         "messages before the answer")
    return LearnExample(prompt=chat.prompt, answer=chat.answer)


def _why(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors())
    return str(exc)


def learn_options(path: Path, *, granularity: str | None, steps: int | None, expand_rank: int | None,
                  expand_steps: int | None, baselines: bool, min_validation: bool) -> LearnOptions:
    """The examples of ``path`` and the flags as :class:`LearnOptions` (what the API's ``learn`` holds); exit 2
    naming the line or the flag."""
    try:
        examples = read_examples(path)
    except InvalidRequestError as exc:
        fail(f"bad --learn examples: {exc.message}", 2)
    tuned = {k: v for k, v in {"granularity": granularity, "steps": steps}.items() if v is not None}
    if expand_rank is not None:
        tuned["expand"] = {"rank": expand_rank, **({"steps": expand_steps} if expand_steps is not None else {})}
    try:
        return LearnOptions(examples=examples, baselines=baselines, min_validation=min_validation, **tuned)
    except ValidationError as exc:
        fail("Invalid value: " + "; ".join(
            (f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors()), 2)


def learn_and_store(comp, name: str, options: LearnOptions, *, quiet: bool) -> tuple[dict, object]:
    """Every stage on the reference model with a bar per stage, then the stored skill: (its record, what to print)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from adapter_store.validation import check_name
    from router.policy import routable
    from server.core.base_model import base_model_id, prepare
    from server.core.state import make_policy
    from server.jobs.learn_api import check_learn, store_learned
    from server.jobs.learn_composition import learn_composition, router_weigher
    from server.jobs.learned_weights import LossModel, base_tokenizer

    s = settings()
    if problems := check_name(name, reserved=(base_model_id(s),)):
        fail("; ".join(problems), 2)
    reg = registry()
    loaded = [reg.load(ref) for ref in comp.skills]  # a missing skill fails here, before the model loads
    infos, adapters = [i for i, _ in loaded], [a for _, a in loaded]
    pinned = [i.ref for i in infos]
    base = prepare(s, quiet=True)
    try:
        check_learn(options, s, base_tokenizer(base), [i.rank for i in infos])
    except InvalidRequestError as exc:
        fail(exc.message, 2)
    with err.status("loading the base model (reference engine)…"):
        model = LossModel(base)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[at]}"),
                  TimeElapsedColumn(), console=err, disable=quiet) as bar:
        stages: dict[str, int] = {}

        def ended() -> None:  # the stages so far have ended (early stopping: some before their last step)
            for task in stages.values():
                done = max(bar.tasks[task].completed, 1)
                bar.update(task, total=done, completed=done)

        def progress(stage: str, step: int, steps: int, train_loss: float, val_loss: float) -> None:
            if stage not in stages:
                ended()
                stages[stage] = bar.add_task(stage, total=steps or None, at="")
            losses = f"  train {train_loss:.4f}  val {val_loss:.4f}" if steps else ""
            bar.update(stages[stage], completed=step, description=f"{stage:<16}{losses}",
                       at=f"step {step}/{steps}" if steps else "")

        weigh = router_weigher(make_policy(s, reg), lambda: (0, routable(reg.list())), pinned)
        learned = learn_composition(model, adapters, pinned, options, weigh=weigh,
                                    start=list(comp.weights) if isinstance(comp.weights, tuple) else 1.0,
                                    progress=progress)
        ended()
    info = store_learned(reg, base_spec(), learned, infos, options, name=name, max_rank=s.max_adapter_rank,
                         text=s.text_limits())
    return info.model_dump(), report_table(info)


def report_table(info) -> Table:
    """The report's rows scored on the held-out examples, the stored one marked."""
    report = info.composition["learn"]["report"]
    table = Table("", "row", "kind", "val exact match", "val loss", "best step", "stopped", "seconds",
                  title=f"stored {info.ref} ({info.origin}, rank {info.rank}): {report['train_examples']} examples "
                        f"trained on, {report['val_examples']} held out")
    for row in report["rows"]:
        table.add_row("→" if row["name"] == report["stored"] else "", row["name"], row["kind"],
                      f"{row['val_exact_match']:.0%}", f"{row['val_loss']:.4f}",
                      "" if row["best_step"] is None else str(row["best_step"]), row["stopped"] or "",
                      f"{row['seconds']:.1f}")
    return table
