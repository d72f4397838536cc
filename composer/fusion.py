"""Fusion: an exact composition whose weights vary per skill, per (skill, layer) or per (skill, layer, module).

ΔW_module = Σ_i w_{i, g(module)} · s_i B_i A_i, where g maps a module to its column of the weights table: one
column for the whole adapter (``"skill"``, today's LoraHub weights), one per layer (``"layer"``, LoRA-Flow's
layer-wise fusion) or one per module (``"module"``). It is still concatenation = summation (ALGORITHMS.md): per
module [w_1 s_1 B_1 | … | w_K s_K B_K] · [A_1; …; A_K], rank Σ r_i, no cross terms. The weights enter only B,
so the composition is linear in w — what makes learning them by gradient exact and cheap (server/jobs/fusion_learning.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from composer.compose import layer_index
from composer.errors import CompositionError
from composer.registry import MAX_SKILLS
from lora.adapter import LoraAdapter
from lora.errors import InvalidRequestError
from lora.factors import concat

Granularity = Literal["skill", "layer", "module"]
GRANULARITIES: tuple[str, ...] = ("skill", "layer", "module")
ALL = "*"  # the one column of "skill"; under "layer", the column of modules outside numbered layers


def group_of(granularity: Granularity, module: str) -> str:
    """The column a module's weight is read from: ``"*"`` (skill), its layer index (layer; ``"*"`` for a
    module outside ``.layers.N.``, e.g. ``lm_head``) or its own name (module)."""
    if granularity == "skill":
        return ALL
    if granularity == "layer":
        layer = layer_index(module)
        return ALL if layer is None else str(layer)
    if granularity == "module":
        return module
    raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")


def groups_for(granularity: Granularity, modules: Sequence[str]) -> tuple[str, ...]:
    """The columns the weights of these modules need, in a stable order (layers numerically, ``"*"`` last)."""
    groups = {group_of(granularity, m) for m in modules}
    return tuple(sorted(groups, key=lambda g: (g == ALL, int(g) if g.isdigit() else 0, g)))


class FusionWeights(BaseModel):
    """The weights of a fusion: ``table[i][j]`` is skill i's weight on column ``groups[j]``.

    Stored as JSON in a skill record (``model_dump(mode="json")`` / ``model_validate``); every problem with
    a table is reported at once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    granularity: Granularity
    skills: tuple[str, ...] = Field(min_length=1, max_length=MAX_SKILLS,
                                    description="the skills, in the table's row order")
    groups: tuple[str, ...] = Field(min_length=1, description=(
        "the table's columns: ['*'] (skill), layer indices as strings (layer; '*' for modules outside numbered "
        "layers) or module names (module)"))
    table: tuple[tuple[float, ...], ...] = Field(description="one row per skill, one weight per column")
    _columns: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "FusionWeights":
        problems = []
        if len(set(self.groups)) != len(self.groups):
            problems.append("groups must be distinct")
        if self.granularity == "skill" and self.groups != (ALL,):
            problems.append(f"granularity 'skill' has the one column {ALL!r}, got {list(self.groups)}")
        if self.granularity == "layer":
            bad = [g for g in self.groups if g != ALL and not (g.isdigit() and g.isascii())]
            if bad:
                problems.append(f"granularity 'layer' has layer indices (or {ALL!r}) as columns, got {bad[:5]}")
        if len(self.table) != len(self.skills):
            problems.append(f"table has {len(self.table)} rows for {len(self.skills)} skills")
        wrong = [i for i, row in enumerate(self.table) if len(row) != len(self.groups)]
        if wrong:
            problems.append(f"table rows {wrong[:5]} do not have one weight per column ({len(self.groups)})")
        if not all(math.isfinite(w) for row in self.table for w in row):
            problems.append("weights must be finite numbers")
        if problems:
            raise ValueError("; ".join(problems))
        self._columns = {g: j for j, g in enumerate(self.groups)}
        return self

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def broadcast(cls, granularity: Granularity, skills: Sequence[str], modules: Sequence[str],
                  values: float | Sequence[float] = 1.0) -> "FusionWeights":
        """Weights for these modules at a granularity, each skill's value (one for all, or one per skill) in
        every column: the start of a learner, or per-skill weights seen at a finer granularity."""
        values = [float(values)] * len(skills) if isinstance(values, (int, float)) else [float(v) for v in values]
        if len(values) != len(skills):
            raise InvalidRequestError(f"{len(skills)} skills but {len(values)} weights", param="weights")
        groups = groups_for(granularity, modules)
        return cls(granularity=granularity, skills=tuple(skills), groups=groups,
                   table=tuple(tuple(v for _ in groups) for v in values))

    def with_table(self, table: torch.Tensor | Sequence[Sequence[float]]) -> "FusionWeights":
        """The same skills and columns with other weights (e.g. a learner's tensor, K × G)."""
        rows = table.detach().double().tolist() if isinstance(table, torch.Tensor) else table
        return type(self)(granularity=self.granularity, skills=self.skills, groups=self.groups,
                          table=tuple(tuple(float(w) for w in row) for row in rows))

    # ---- reading ------------------------------------------------------------------------------------
    def tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The table as a K × G tensor."""
        return torch.tensor(self.table, dtype=dtype)

    def column(self, module: str) -> int:
        """The table column a module's weights are read from (InvalidRequestError when it has none)."""
        group = group_of(self.granularity, module)
        if group not in self._columns:
            raise InvalidRequestError(f"the fusion weights have no column for {module} ({group!r})", param="weights")
        return self._columns[group]

    def weight(self, skill: int, module: str) -> float:
        """w_{skill, g(module)}."""
        return self.table[skill][self.column(module)]


@dataclass(frozen=True)
class ModuleStack:
    """One module's factors of every skill that has it, each scaling folded into B:
    ΔW(w) = B · diag(w[skill, column]) · A, for any table w (K × G)."""

    A: torch.Tensor  # (R × d_in), R = Σ r_i over the skills that have the module
    B: torch.Tensor  # (d_out × R), s_i B_i in skill i's columns
    skill: torch.Tensor  # (R,) long: the skill each rank row belongs to
    column: int  # the table column the module reads

    def row_weights(self, table: torch.Tensor) -> torch.Tensor:
        """w[skill of each rank row, column] (R,): differentiable in ``table``."""
        return table[self.skill, self.column]


def stacks(adapters: Sequence[LoraAdapter], weights: FusionWeights,
           dtype: torch.dtype = torch.float32) -> dict[str, ModuleStack]:
    """Every module of the union of the adapters' modules, stacked. A skill that lacks a module adds nothing
    there (its ΔW is zero), as :func:`composer.compose` treats it. Raises InvalidRequestError, all problems at
    once, when the weights' skills do not match the adapters or their columns are not exactly the ones the
    modules need (a missing column has no weight; an extra one was learned for other adapters)."""
    if len(adapters) != len(weights.skills):
        raise InvalidRequestError(f"{len(weights.skills)} skills in the weights but {len(adapters)} adapters",
                                  param="weights")
    per_adapter = [a.modules() for a in adapters]
    names = sorted(set().union(*per_adapter))
    needed = set(groups_for(weights.granularity, names))
    problems = []
    if missing := sorted(needed - set(weights.groups)):
        problems.append(f"no {weights.granularity} weights for {missing[:8]}")
    if extra := [g for g in weights.groups if g not in needed]:
        problems.append(f"{weights.granularity} weights for {extra[:8]}, which none of the adapters' modules has")
    if problems:
        raise InvalidRequestError("the fusion weights do not fit the adapters: " + "; ".join(problems), param="weights")
    out: dict[str, ModuleStack] = {}
    for name in names:
        present = [(i, m[name]) for i, m in enumerate(per_adapter) if name in m]
        A, B = concat([(f.A.to(dtype), (f.scaling * f.B.double()).to(dtype)) for _, f in present])
        skill = torch.cat([torch.full((f.rank,), i, dtype=torch.long) for i, f in present])
        out[name] = ModuleStack(A=A, B=B, skill=skill, column=weights.column(name))
    return out


def fuse(adapters: Sequence[LoraAdapter], weights: FusionWeights, *, base_model: str | None = None) -> LoraAdapter:
    """The exact fusion Σ_i w_{i,g(module)} ΔW_{i,module} as one PEFT adapter: factors concatenated per module
    (rank Σ r_i over the skills that have it), each w_{i,g} · s_i folded into B_i, every module zero-padded to
    one rank with ``r = lora_alpha`` (scaling 1), as :func:`composer.compose`'s ``linear`` builds it, so any
    engine serves it as a plain adapter."""
    table = weights.tensor(torch.float64)
    out = {}
    for name, st in stacks(adapters, weights, dtype=torch.float64).items():
        A, B = st.A, st.B * st.row_weights(table)[None, :]
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CompositionError(f"the fusion produced non-finite values in {name}")
        out[name] = (A, B)
    return LoraAdapter.from_modules(out, base_model=base_model or adapters[0].config.get("base_model_name_or_path"))
