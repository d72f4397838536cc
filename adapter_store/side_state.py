"""State the registry keeps for others: the engine's integer ids per served content, and other rooms'
auxiliary hashes (e.g. the router's trained model). The registry
exposes them under its guard (``registry.engine_ids``, ``registry.aux``)."""

from __future__ import annotations

import contextlib

import redis
from redis.exceptions import LockNotOwnedError

from adapter_store.layout import KeyLayout


class EngineIds:
    """One integer id per served content, handed out by a counter so that every replica agrees."""

    def __init__(self, client: redis.Redis, keys: KeyLayout) -> None:
        self.r, self.keys = client, keys

    def get(self, key: str, above: int = 0) -> int:
        """The engine's integer id for the served content ``key`` (a content id or a composition key):
        handed out by a counter, so every replica agrees and no two contents ever share an id.
        ``above``: the caller's engine already uses ids up to this one for other content (Redis lost
        its ids, e.g. a restart without persistence): the counter moves past it and ``key`` gets a new id."""
        ids = self.keys.engine_ids
        if above:
            self.r.transaction(lambda pipe: self._move_counter(pipe, above, key), self.keys.engine_ids_next)
        got = self.r.hget(ids, key)
        if got is None:
            self.r.hsetnx(ids, key, self.r.incr(self.keys.engine_ids_next))  # a racing replica's wins
            got = self.r.hget(ids, key)
        return int(got)

    def _move_counter(self, pipe: redis.client.Pipeline, above: int, key: str) -> None:
        current = int(pipe.get(self.keys.engine_ids_next) or 0)
        pipe.multi()
        if current < above:
            pipe.set(self.keys.engine_ids_next, above)
        pipe.hdel(self.keys.engine_ids, key)


class AuxStore:
    """Hashes ``P:aux:KEY`` that other rooms keep beside the library."""

    def __init__(self, client: redis.Redis, keys: KeyLayout) -> None:
        self.r, self.keys = client, keys

    def put(self, key: str, mapping: dict[str, bytes | str]) -> None:
        """Replace the hash atomically."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.aux(key))
            pipe.hset(self.keys.aux(key), mapping=mapping)
            pipe.execute()

    def get(self, key: str, fields: list[str] | None = None) -> dict[str, bytes]:
        """Every field (``fields`` None), or those of ``fields`` that are set."""
        if fields is None:
            return {k.decode(): v for k, v in self.r.hgetall(self.keys.aux(key)).items()}
        if not fields:  # HMGET needs at least one field
            return {}
        return {f: v for f, v in zip(fields, self.r.hmget(self.keys.aux(key), fields)) if v is not None}

    def add_fields(self, key: str, mapping: dict[str, bytes | str]) -> None:
        self.r.hset(self.keys.aux(key), mapping=mapping)

    def field_names(self, key: str) -> set[str]:
        """The names of the hash's fields (not their values)."""
        return {f.decode() for f in self.r.hkeys(self.keys.aux(key))}

    def delete_fields(self, key: str, fields: list[str], batch: int = 10_000) -> int:
        """Delete ``fields`` from the hash (a batch per command, so Redis never stalls on one); how many were there."""
        return sum(self.r.hdel(self.keys.aux(key), *fields[i:i + batch]) for i in range(0, len(fields), batch))

    def lock(self, name: str, seconds: float) -> SharedLock:
        """A lock named ``name`` beside this state, shared by replicas (it expires after ``seconds``)."""
        return SharedLock(self.r.lock(self.keys.aux(f"{name}:lock"), timeout=seconds))


class SharedLock:
    """A lock replicas share (a Redis lock with an expiry), so that other rooms need not know Redis's: ``acquire``
    waits at most ``wait`` seconds; ``release`` of a lock that expired meanwhile is a no-op (it is gone)."""

    def __init__(self, lock: redis.lock.Lock) -> None:
        self._lock = lock

    def acquire(self, wait: float) -> bool:
        return bool(self._lock.acquire(blocking=True, blocking_timeout=wait))

    def release(self) -> None:
        with contextlib.suppress(LockNotOwnedError):
            self._lock.release()


__all__ = ["AuxStore", "EngineIds", "SharedLock"]
