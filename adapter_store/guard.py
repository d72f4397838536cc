"""The registry's error guard: a lost Redis becomes one clear error, and every operation's outcome is reported."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from adapter_store.errors import MosaicError, UnavailableError

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
        report("rejected" if exc.status < 500 else "error")
        raise
    except BaseException:
        report("error")
        raise
    report("ok")


__all__ = ["Observer", "redis_guard"]
