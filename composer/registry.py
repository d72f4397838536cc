"""The merge-method registry: one decorated pure function per method, with its metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r × d_in, B: d_out × r) with scaling and weight folded into B


class MethodFn(Protocol):
    def __call__(self, factors: list[Factors], *, rank: int | None, **params: Any) -> Factors: ...


@dataclass(frozen=True)
class Param:
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``fn`` maps one module's weighted factors to a single (A, B)."""

    name: str
    fn: MethodFn
    reference: str
    space: Literal["factors", "dense"]
    description: str
    params: dict[str, Param] = field(default_factory=dict)
    needs_rank: bool = False  # True: the caller must give a target rank (or "auto" picks one)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(self.params)}")
        out = {k: p.default for k, p in self.params.items()}
        for k, v in params.items():
            try:
                out[k] = self.params[k].type(v)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"parameter {k!r} of {self.name!r} must be {self.params[k].type.__name__}: {exc}") from exc
        return out


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    reference: str,
    space: Literal["factors", "dense"],
    description: str,
    params: dict[str, Param] | None = None,
    needs_rank: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register a merge method under ``name``; a duplicate name is an error, never an overwrite."""

    def register(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(
            name=name, fn=fn, reference=reference, space=space, description=description,
            params=dict(params or {}), needs_rank=needs_rank,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
