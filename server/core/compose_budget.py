"""Every composition the server computes goes one way (:class:`Composer`): its estimated cost checked
against the budget (MOSAIC_MAX_COMPOSE_WORK, MOSAIC_MAX_COMPOSE_GIB) before any work, then run on the
server's own compose threads (MOSAIC_COMPOSE_WORKERS), and stopped when whoever asked for it gives up.
Inference, stored compositions (and their quality reports) and learned-weight searches all call it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from adapter_store.skill_info import SkillInfo
from composer import ComposeReport, Composition, compose, compose_cost
from lora.adapter import LoraAdapter
from lora.errors import InvalidRequestError
from server.core.settings import Settings


@dataclass(frozen=True)
class ComposeBudget:
    """What one composition may cost (composer.compose_cost's estimate), and the base model's module shapes
    the estimate is made from."""

    shapes: dict[str, tuple[int, int]]
    max_work: float | None = None  # multiply-adds; None: ``settings.max_compose_work`` (MOSAIC_MAX_COMPOSE_WORK)
    max_bytes: float | None = None  # peak working set; None: ``settings.max_compose_gib`` (MOSAIC_MAX_COMPOSE_GIB)
    settings: Settings | None = None  # read at each check, not copied

    def limits(self) -> tuple[float, float]:
        """(multiply-adds, bytes) allowed now."""
        s = self.settings
        return (self.max_work if self.max_work is not None else s.max_compose_work,
                self.max_bytes if self.max_bytes is not None else s.max_compose_gib * 2**30)

    def check(self, comp: Composition, infos: Sequence[SkillInfo], param: str = "composition") -> None:
        max_work, max_bytes = self.limits()
        targets = {t for i in infos for t in i.target_modules}
        shapes = [s for name, s in self.shapes.items() if name.rsplit(".", 1)[-1] in targets]
        cost = compose_cost(comp.method, comp.resolved_params, shapes, [i.rank for i in infos])
        if cost.work > max_work:
            raise InvalidRequestError(
                f"this composition would take about {cost.work:.2g} multiply-adds; the server allows {max_work:.2g} "
                "(setting MOSAIC_MAX_COMPOSE_WORK): use fewer skills, a cheaper method or smaller parameters",
                param=param)
        if cost.peak_bytes > max_bytes:
            raise InvalidRequestError(
                f"this composition would need about {cost.peak_bytes / 2**30:.2f} GiB at once; the server allows "
                f"{max_bytes / 2**30:.2f} (setting MOSAIC_MAX_COMPOSE_GIB)", param=param)


class Composer:
    """Compositions within a budget (none: unbounded, as for the CLI), on a pool of their own: registry
    calls on the default pool never wait behind them."""

    def __init__(self, budget: ComposeBudget | None = None, workers: int = 1) -> None:
        self.budget = budget
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mosaic-compose")

    def check(self, comp: Composition, infos: Sequence[SkillInfo], param: str = "composition") -> None:
        """A 400 naming the setting when ``comp`` over ``infos`` would cost more than the budget."""
        if self.budget is not None:
            self.budget.check(comp, infos, param)

    async def compose(self, comp: Composition, infos: Sequence[SkillInfo], adapters: Sequence[LoraAdapter], *,
                      max_rank: int | None) -> tuple[LoraAdapter, ComposeReport]:
        """``comp`` (fixed weights) over ``adapters`` (read as ``infos``); when the awaiting task is cancelled
        (the client left), the work stops before its next module."""
        self.check(comp, infos)
        stop = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: compose(list(adapters), max_rank=max_rank, stop=stop, **comp.compose_kwargs()))
        except asyncio.CancelledError:
            stop.set()
            raise

    def compose_blocking(self, comp: Composition, infos: Sequence[SkillInfo], adapters: Sequence[LoraAdapter], *,
                         max_rank: int | None, stop: threading.Event | None = None) -> tuple[LoraAdapter, ComposeReport]:
        """The same from a worker thread (never from one of this pool's own): waits for a compose thread;
        ``stop`` set ends the work with composer.CompositionCancelled."""
        self.check(comp, infos)
        return self._pool.submit(lambda: compose(list(adapters), max_rank=max_rank, stop=stop,
                                                 **comp.compose_kwargs())).result()


def check_composition(settings: Settings, comp: Composition, param: str = "composition.skills") -> None:
    """At most ``max_composition_skills`` skills in one composition."""
    if len(comp.skills) > settings.max_composition_skills:
        raise InvalidRequestError(
            f"a composition may hold at most {settings.max_composition_skills} skills; this one has {len(comp.skills)} "
            "(setting MOSAIC_MAX_COMPOSITION_SKILLS)", param=param,
        )
