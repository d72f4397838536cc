"""The skill registry in Redis.

Layout (``P`` is the key prefix, so tests and deployments can share one Redis):

``P:names``                  SET of skill names
``P:s:NAME:versions``        ZSET of version numbers (score = version)
``P:s:NAME:latest``          the latest version number
``P:s:NAME:next``            the highest version ever handed out (numbers are never reused)
``P:s:NAME:v:N``             HASH {meta, config, weights} — one complete version
``P:gen``                    bumped on every change, so replicas can tell their caches are stale
``P:events``                 pub/sub channel announcing each change
``P:c:HASH``                 HASH of a cached composition result (same fields as a version)

Every write is one MULTI/EXEC transaction guarded by WATCH, so a reader sees a version
completely or not at all, and a write that fails before EXEC leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

import redis
from pydantic import BaseModel, Field

from adapter_store.adapter import LoraAdapter
from adapter_store.errors import InvalidRequestError, MosaicError, NotFoundError, UnavailableError


class SkillInfo(BaseModel):
    """Metadata of one stored skill version."""

    name: str
    version: int
    sha256: str
    base_model: str | None = None
    rank: int
    target_modules: list[str]
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    size: int = 0
    created: float = 0.0
    origin: str = "upload"
    composition: dict | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    name, sep, ver = ref.partition("@")
    if not sep:
        return name, None
    if not ver.isdigit() or int(ver) < 1:
        raise InvalidRequestError(f"bad skill reference {ref!r}: the version after '@' must be a positive integer")
    return name, int(ver)


class Registry:
    def __init__(self, client: redis.Redis, prefix: str = "mosaic",
                 observer: Callable[[str, str], None] | None = None) -> None:
        self.r = client
        self.p = prefix
        self.observer = observer  # called with (operation, "ok" | "rejected" | "unavailable" | "error") after each one

    # ---- keys ---------------------------------------------------------------------
    def _k(self, *parts: object) -> str:
        return ":".join([self.p, *map(str, parts)])

    def _vkey(self, name: str, version: int) -> str:
        return self._k("s", name, "v", version)

    def _step(self, label: str) -> None:
        """Called between the staged steps of a write; tests replace it to inject a failure."""

    # ---- writes -------------------------------------------------------------------
    def add(
        self,
        name: str,
        adapter: LoraAdapter,
        *,
        description: str = "",
        examples: Iterable[str] = (),
        tags: Iterable[str] = (),
        origin: str = "upload",
        composition: dict | None = None,
    ) -> SkillInfo:
        """Store ``adapter`` as the next version of ``name`` (atomically) and return its metadata."""
        weights, config = adapter.weights_bytes(), adapter.config_bytes()
        with self._guard("add"):
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._k("s", name, "next"))
                        version = int(pipe.get(self._k("s", name, "next")) or 0) + 1
                        info = SkillInfo(
                            name=name,
                            version=version,
                            sha256=adapter.sha256(),
                            base_model=adapter.config.get("base_model_name_or_path"),
                            rank=adapter.rank,
                            target_modules=adapter.target_modules,
                            description=description,
                            examples=list(examples),
                            tags=list(tags),
                            size=len(weights),
                            created=time.time(),
                            origin=origin,
                            composition=composition,
                        )
                        pipe.multi()
                        pipe.hset(
                            self._vkey(name, version),
                            mapping={"meta": info.model_dump_json(), "config": config, "weights": weights},
                        )
                        self._step("version-written")
                        pipe.zadd(self._k("s", name, "versions"), {str(version): version})
                        pipe.set(self._k("s", name, "next"), version)
                        pipe.set(self._k("s", name, "latest"), version)
                        self._step("pointers-written")
                        pipe.sadd(self._k("names"), name)
                        self._announce(pipe, "add", info.ref)
                        pipe.execute()
                        return info
                    except redis.WatchError:
                        continue

    def delete(self, ref: str) -> list[SkillInfo]:
        """Delete one version (``name@N``) or every version of a skill (``name``)."""
        name, version = parse_ref(ref)
        with self._guard("delete"):
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._k("s", name, "versions"))
                        have = [int(v) for v in pipe.zrange(self._k("s", name, "versions"), 0, -1)]
                        if not have or (version is not None and version not in have):
                            raise NotFoundError(f"skill {ref!r} does not exist", param="name")
                        doomed = have if version is None else [version]
                        infos = [self._meta(pipe.hget(self._vkey(name, v), "meta")) for v in doomed]
                        remaining = [v for v in have if v not in doomed]
                        pipe.multi()
                        pipe.delete(*[self._vkey(name, v) for v in doomed])
                        if remaining:
                            pipe.zrem(self._k("s", name, "versions"), *map(str, doomed))
                            pipe.set(self._k("s", name, "latest"), max(remaining))
                        else:
                            pipe.delete(
                                self._k("s", name, "versions"), self._k("s", name, "latest"), self._k("s", name, "next")
                            )
                            pipe.srem(self._k("names"), name)
                        self._announce(pipe, "delete", ref)
                        pipe.execute()
                        return infos
                    except redis.WatchError:
                        continue

    def _announce(self, pipe: redis.client.Pipeline, event: str, ref: str) -> None:
        pipe.incr(self._k("gen"))
        pipe.publish(self._k("events"), json.dumps({"event": event, "ref": ref}))

    # ---- reads --------------------------------------------------------------------
    def resolve(self, ref: str) -> tuple[str, int]:
        name, version = parse_ref(ref)
        with self._guard("resolve"):
            if version is None:
                latest = self.r.get(self._k("s", name, "latest"))
                if latest is None:
                    raise NotFoundError(f"skill {name!r} does not exist", param="model")
                return name, int(latest)
            if self.r.zscore(self._k("s", name, "versions"), str(version)) is None:
                raise NotFoundError(f"skill {ref!r} does not exist", param="model")
            return name, version

    def info(self, ref: str) -> SkillInfo:
        name, version = self.resolve(ref)
        with self._guard("info"):
            raw = self.r.hget(self._vkey(name, version), "meta")
        if raw is None:  # deleted between resolve and read
            raise NotFoundError(f"skill {ref!r} does not exist", param="model")
        return self._meta(raw)

    def load(self, ref: str) -> tuple[SkillInfo, LoraAdapter]:
        name, version = self.resolve(ref)
        with self._guard("load"):
            meta, config, weights = self.r.hmget(self._vkey(name, version), ["meta", "config", "weights"])
        if meta is None:
            raise NotFoundError(f"skill {ref!r} does not exist", param="model")
        return self._meta(meta), LoraAdapter.from_bytes(config, weights)

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except NotFoundError:
            return False

    def names(self) -> list[str]:
        with self._guard("names"):
            return sorted(n.decode() for n in self.r.smembers(self._k("names")))

    def list(self) -> list[SkillInfo]:
        """The latest version of every skill, by name."""
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except NotFoundError:  # deleted while listing
                pass
        return out

    def versions(self, name: str) -> list[SkillInfo]:
        with self._guard("versions"):
            have = [int(v) for v in self.r.zrange(self._k("s", name, "versions"), 0, -1)]
            if not have:
                raise NotFoundError(f"skill {name!r} does not exist", param="name")
            raws = [self.r.hget(self._vkey(name, v), "meta") for v in have]
        return [self._meta(raw) for raw in raws if raw is not None]

    def generation(self) -> int:
        with self._guard("generation"):
            return int(self.r.get(self._k("gen")) or 0)

    # ---- composition cache ----------------------------------------------------------
    def put_composition(self, key: str, adapter: LoraAdapter, meta: dict) -> None:
        with self._guard("put_composition"):
            self.r.hset(
                self._k("c", key),
                mapping={"meta": json.dumps(meta), "config": adapter.config_bytes(), "weights": adapter.weights_bytes()},
            )

    def get_composition(self, key: str) -> tuple[dict, LoraAdapter] | None:
        with self._guard("get_composition"):
            meta, config, weights = self.r.hmget(self._k("c", key), ["meta", "config", "weights"])
        if meta is None or config is None or weights is None:
            return None
        return json.loads(meta), LoraAdapter.from_bytes(config, weights)

    # ---- auxiliary state of other rooms (e.g. the router's trained model) -------------
    def put_aux(self, key: str, mapping: dict[str, bytes | str]) -> None:
        """Replace the hash ``P:aux:KEY`` atomically."""
        with self._guard("put_aux"), self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("aux", key))
            pipe.hset(self._k("aux", key), mapping=mapping)
            pipe.execute()

    def get_aux(self, key: str, fields: list[str] | None = None) -> dict[str, bytes]:
        with self._guard("get_aux"):
            if fields is None:
                return {k.decode(): v for k, v in self.r.hgetall(self._k("aux", key)).items()}
            return {f: v for f, v in zip(fields, self.r.hmget(self._k("aux", key), fields)) if v is not None}

    def add_aux_fields(self, key: str, mapping: dict[str, bytes | str]) -> None:
        with self._guard("add_aux_fields"):
            self.r.hset(self._k("aux", key), mapping=mapping)

    # ---- helpers ------------------------------------------------------------------
    @staticmethod
    def _meta(raw: bytes | None) -> SkillInfo:
        if raw is None:
            raise NotFoundError("skill vanished while it was read", param="model")
        return SkillInfo.model_validate_json(raw)

    def _guard(self, op: str):
        return _RedisGuard(op, self.observer)


class _RedisGuard:
    """Turns lost Redis connections into a clear 503-class error, and reports each operation's outcome."""

    def __init__(self, op: str, observer: Callable[[str, str], None] | None) -> None:
        self.op, self.observer = op, observer

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        lost = exc is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
        if self.observer is not None:
            outcome = ("ok" if exc is None else "unavailable" if lost
                       else "rejected" if isinstance(exc, MosaicError) and exc.status < 500 else "error")
            self.observer(self.op, outcome)
        if lost:
            raise UnavailableError(f"the skill registry (Redis) is unavailable: {exc}") from exc
        return False


__all__ = ["Registry", "SkillInfo", "parse_ref"]
