"""The merge-method registry: one decorated pure function per method, with its metadata."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lora.factors import Factors

MAX_SKILLS = 256  # skills in one composition: the schema's bound; servers apply their own, lower limit


@dataclass(frozen=True)
class MethodContext:
    """What a method may know besides the factors: which module (and its layer), the rank cap for ``auto``,
    and which of the composition's inputs have this module (``factors[j]`` is input ``inputs[j]``)."""

    module: str = ""
    cap: int = 64
    layer: int | None = None
    inputs: tuple[int, ...] = ()


class MethodFn(Protocol):
    def __call__(self, factors: list[Factors], *, rank: int | None, ctx: MethodContext, **params: Any) -> Factors: ...


def _same_weights(weights: list[float], params: dict[str, Any]) -> list[float]:
    return list(weights)


@dataclass(frozen=True)
class Param:
    type: type
    default: Any
    help: str
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple | None = None

    def check(self, name: str, value: Any) -> Any:
        if self.type is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
            value = value.lower() in ("true", "1", "yes")
        try:
            value = self.type(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"parameter {name!r} must be {self.type.__name__}: {exc}") from exc
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every bound check below
            raise ValueError(f"parameter {name!r} must be a finite number, got {value!r}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ValueError(f"parameter {name!r} must be within [{self.low}, {self.high}], got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {name!r} must be one of {list(self.choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``fn`` maps one module's weighted factors to a single (A, B)."""

    name: str
    fn: MethodFn
    reference: str
    space: Literal["factors", "dense"]
    description: str
    params: dict[str, Param] = field(default_factory=dict)
    max_inputs: int | None = None  # at most this many skills (None: any number)
    # adapter-level weight transform applied before weights are folded in (e.g. PSEC's softmax/top-k)
    weights_fn: Callable[[list[float], dict[str, Any]], list[float]] = _same_weights

    def check_inputs(self, count: int) -> None:
        if self.max_inputs is not None and count > self.max_inputs:
            raise ValueError(f"method {self.name!r} takes at most {self.max_inputs} skills, got {count}")

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(self.params)}")
        out = {k: p.default for k, p in self.params.items()}
        for k, v in params.items():
            out[k] = self.params[k].check(k, v)
        return out


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    reference: str,
    space: Literal["factors", "dense"],
    description: str,
    params: dict[str, Param] | None = None,
    weights_fn: Callable[[list[float], dict[str, Any]], list[float]] | None = None,
    max_inputs: int | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register a merge method under ``name``; a duplicate name is an error, never an overwrite."""

    def register(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(
            name=name, fn=fn, reference=reference, space=space, description=description,
            params=dict(params or {}), weights_fn=weights_fn or _same_weights,
            max_inputs=max_inputs,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
