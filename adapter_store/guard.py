"""The registry's error guard: a lost Redis becomes one clear error, and every operation's outcome is reported."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from lora.errors import MosaicError, UnavailableError

log = logging.getLogger("mosaic.registry")

Observer = Callable[[str, str], None]  # (operation, "ok" | "rejected" | "unavailable" | "error")


@contextmanager
def redis_guard(op: str, observer: Observer | None = None) -> Iterator[None]:
    """Turns lost Redis connections into a clear 503-class :class:`UnavailableError` (the connection's
    details go to the log, not to clients), and tells ``observer`` how operation ``op`` ended."""

    def report(outcome: str) -> None:
        if observer is not None:
            observer(op, outcome)

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        report("unavailable")
        log.warning("Redis unavailable during %s: %s", op, exc)
        raise UnavailableError("the skill registry (Redis) is unavailable; try again shortly") from exc
    except MosaicError as exc:
        report("rejected" if exc.caller_fault else "error")
        raise
    except BaseException:
        report("error")
        raise
    report("ok")


class Guarded:
    """One of the registry's parts (composition cache, engine ids, aux state) as other rooms use it: each
    method call runs under :func:`redis_guard`, named ``PART.METHOD`` for the observer."""

    def __init__(self, part: object, name: str, observer: Observer | None) -> None:
        self._part, self._name, self._observer = part, name, observer

    def __setattr__(self, attr: str, value) -> None:
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:  # a setting of the part (e.g. the cache's budget)
            setattr(self._part, attr, value)

    def __getattr__(self, attr: str):
        value = getattr(self._part, attr)
        if not callable(value):
            return value

        def guarded(*args, **kwargs):
            with redis_guard(f"{self._name}.{attr}", self._observer):
                return value(*args, **kwargs)

        return guarded


__all__ = ["Guarded", "Observer", "redis_guard"]
