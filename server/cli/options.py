"""Command options generated from a pydantic model's fields, as mergekit builds its CLI from
``MergeOptions.model_fields``: the model that validates the API body is the one source of every
flag's name, default, bounds and help."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated

import annotated_types
import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from server.cli.common import fail


def model_options(model: type[BaseModel], param: str = "options") -> Callable[[Callable], Callable]:
    """Decorator: the command's ``param`` becomes one option per field of ``model`` (``--field-name``),
    and the command receives the validated ``model`` instance there. A value the model refuses exits 2
    with ``Invalid value: --flag: why``, as click's own checks do."""

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        fields = [_parameter(name, field) for name, field in model.model_fields.items()]
        params = []
        for p in inspect.signature(command).parameters.values():
            if p.name == param:
                params += fields
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]))

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in model.model_fields}
            try:
                options = model(**values)
            except ValidationError as exc:
                fail("Invalid value: " + "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                                   for e in exc.errors()), 2)
            return command(**kwargs, **{param: options})

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    if field.annotation is bool:  # a plain switch, as --keep-originals has always been (no --no-… twin)
        option = typer.Option(flag, help=field.description)
    else:
        option = typer.Option(**{"help": field.description, **_bounds(field)})
    default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[field.annotation, option])


def _bounds(field: FieldInfo) -> dict:
    """Closed bounds become click's range check (``--help`` shows them, click refuses first); an open bound,
    which click's range type cannot hold here, is written into the help and left to the model to check."""
    bound = {type(m): m for m in field.metadata}
    ge, gt = bound.get(annotated_types.Ge), bound.get(annotated_types.Gt)
    le, lt = bound.get(annotated_types.Le), bound.get(annotated_types.Lt)
    if gt is None and lt is None:
        number = float if float in (typing.get_args(field.annotation) or (field.annotation,)) else int
        return {"min": number(ge.ge) if ge else None, "max": number(le.le) if le else None}
    lower = f"{gt.gt} < " if gt else f"{ge.ge} ≤ " if ge else ""
    upper = f" < {lt.lt}" if lt else f" ≤ {le.le}" if le else ""
    return {"help": f"{field.description or ''} ({lower}x{upper})".strip()}
