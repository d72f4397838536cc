"""The skill registry in Redis: the facade every other room uses.

It stores skill versions (add, delete, resolve, load, list) and hands the rest to its parts: the key
names (adapter_store/layout.py), shard pools (shard_store.py), cached compositions
(composition_cache.py), engine ids and other rooms' state (side_state.py). Other rooms reach those
parts as ``registry.compositions``, ``.engine_ids``, ``.aux`` and ``.shards``; every operation, the
parts' included, runs under the error guard (guard.py).

Every write is one MULTI/EXEC transaction guarded by WATCH (redis-py's ``Redis.transaction``, which
retries when a watched key changed), so a reader sees a version completely or not at all, and a write
that fails before EXEC leaves nothing behind.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple

import cachetools
import redis

from adapter_store import mos
from adapter_store.composition_cache import CompositionCache
from adapter_store.guard import Guarded, Observer, redis_guard
from adapter_store.high_water import HighWater
from adapter_store.jobs import JobStore
from adapter_store.layout import CHANGE_LOG, KeyLayout, announce
from adapter_store.shard_store import Current, ShardStore, Stored
from adapter_store.side_state import AuxStore, EngineIds
from adapter_store.skill_info import SkillInfo, parse_ref, read_meta
from adapter_store.validation import in_namespace
from lora.adapter import LoraAdapter
from lora.errors import NotFoundError, UnavailableError

log = logging.getLogger("mosaic.registry")


# the generation and the log's entries from the reader's own on (its generation's entry first), in one step;
# false when the reader is further behind than the log is long, or ahead (another Redis)
CHANGES_SINCE = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
local missed = now - tonumber(ARGV[1])
if missed < 0 or missed >= tonumber(ARGV[2]) then return {now, false} end
return {now, redis.call('LRANGE', KEYS[2], -(missed + 1), -1)}
"""


class Changes(NamedTuple):
    """What :meth:`Registry.changes_since` found: the generation now, its log entry's id, and the changes
    since the reader's generation (None: read everything again)."""

    generation: int
    mark: str | None
    changes: list[tuple[str, str]] | None


class Registry:
    def __init__(self, client: redis.Redis, prefix: str = "mosaic",
                 observer: Observer | None = None,
                 composition_cache_bytes: int = 1 << 30, high_water: HighWater | None = None) -> None:
        self.r = client
        self.prefix = prefix
        # what the data dir remembers of this registry: a Redis that went back refuses writes, and versions
        # are numbered above every one handed out (adapter_store/high_water.py); None: Redis alone
        self.high_water = high_water
        self.keys = KeyLayout(prefix)
        self._changes_script = client.register_script(CHANGES_SINCE)
        self.observer: Observer | None = observer  # told (operation, outcome) after each one
        self._compositions = CompositionCache(client, prefix, composition_cache_bytes)
        self._shards = ShardStore(client, self.keys)
        # the parts other rooms reach directly, each call under the guard: cached compositions (put, get,
        # drop_made_from), the engine's integer ids (get) and other rooms' state beside the library (put,
        # get, add_fields, lock)
        self.compositions = Guarded(self._compositions, "compositions", observer)
        self.engine_ids = Guarded(EngineIds(client, self.keys), "engine_ids", observer)
        self.aux = Guarded(AuxStore(client, self.keys), "aux", observer)
        self.jobs = Guarded(JobStore(client, self.keys), "jobs", observer)
        # compression's side of the shard store: compression() (the current pools' options), put_pools,
        # stop, running, lock
        self.shards = Guarded(self._shards, "shards", observer)

    # ---- seams ----------------------------------------------------------------------
    def _k(self, *parts: object) -> str:
        return self.keys.k(*parts)

    def _guard(self, op: str):
        return redis_guard(op, self.observer)

    def _step(self, label: str) -> None:
        """Called between the staged steps of a write; tests replace it to inject a failure."""

    def _storage(self, current: Current, adapter: LoraAdapter, weights: bytes) -> Stored:
        """How an upload is stored under ``current`` pools (tests replace it to race a pool switch)."""
        return self._shards.storage(current, adapter, weights)

    @property
    def _pool_cache(self) -> cachetools.LRUCache:
        """The pools read so far (clear it to read them from Redis again, as a fresh replica would)."""
        return self._shards.cache

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
        k = self.keys

        def write(pipe: redis.client.Pipeline) -> SkillInfo:
            nonlocal stored
            if int(pipe.get(k.pools_current) or 0) != stored.against:
                # the pools changed since it was encoded: encode again (WATCH retries if they change once more;
                # each pass follows a real pool change, and a compression is seconds apart)
                stored = self._storage(self._shards.current(), adapter, weights)
            version = max(int(pipe.get(k.skill(name, "next")) or 0), floor) + 1
            info = SkillInfo(
                name=name, version=version, sha256=adapter.sha256(), config_sha256=adapter.config_sha256(),
                base_model=adapter.config.get("base_model_name_or_path"), rank=adapter.rank,
                target_modules=adapter.target_modules, description=description, examples=list(examples),
                tags=list(tags), size=len(weights), created=time.time(), origin=origin, composition=composition,
                mos=stored.meta,
            )
            pipe.multi()
            pipe.hset(k.version(name, version), mapping={"meta": info.model_dump_json(), "config": config, **stored.fields})
            self._step("version-written")
            pipe.zadd(k.skill(name, "versions"), {str(version): version})
            pipe.set(k.skill(name, "next"), version)
            pipe.set(k.skill(name, "latest"), version)
            self._step("pointers-written")
            pipe.sadd(k.names, name)
            pipe.sadd(k.content(info.content_id), info.ref)
            announce(pipe, k, "add", info.ref)
            return info

        with self._guard("add"):
            floor = self._floor()
            stored = self._storage(self._shards.current(), adapter, weights)
            info = self.r.transaction(write, k.skill(name, "next"), k.pools_current, value_from_callable=True)
            self._wrote(info.version)
            return info

    def delete(self, ref: str) -> list[SkillInfo]:
        """Delete one version (``name@N``) or every version of a skill (``name``), and the cached
        compositions made from a content that no version has any more."""
        infos = self._delete(ref)
        self._forget_unused({i.content_id for i in infos})
        return infos

    def _delete(self, ref: str) -> list[SkillInfo]:
        name, version = parse_ref(ref)
        k = self.keys

        def drop(pipe: redis.client.Pipeline) -> list[SkillInfo]:
            have = [int(v) for v in pipe.zrange(k.skill(name, "versions"), 0, -1)]
            if not have or (version is not None and version not in have):
                raise NotFoundError(f"skill {ref!r} does not exist", param="name")
            doomed = have if version is None else [version]
            pipe.watch(*[k.version(name, v) for v in doomed])  # a recode in between: read again
            infos = [read_meta(pipe.hget(k.version(name, v), "meta")) for v in doomed]
            remaining = [v for v in have if v not in doomed]
            pipe.multi()
            pipe.delete(*[k.version(name, v) for v in doomed])
            for info in infos:
                pipe.srem(k.content(info.content_id), info.ref)
            if remaining:
                pipe.zrem(k.skill(name, "versions"), *map(str, doomed))
                pipe.set(k.skill(name, "latest"), max(remaining))
            else:
                # "next" stays: a name deleted and uploaded again goes on counting, so a
                # client pinned to name@N never gets other weights under it
                pipe.delete(k.skill(name, "versions"), k.skill(name, "latest"))
                pipe.srem(k.names, name)
            announce(pipe, k, "delete", ref)
            return infos

        with self._guard("delete"):
            self._floor()
            infos = self.r.transaction(drop, k.skill(name, "versions"), value_from_callable=True)
            self._wrote()
            return infos

    def _floor(self) -> int:
        """Before a write: the number new versions must exceed besides Redis's count (raises when Redis went back)."""
        return self.high_water.floor(self.r, self.keys) if self.high_water is not None else 0

    def _wrote(self, version: int = 0) -> None:
        if self.high_water is not None:
            self.high_water.wrote(self.r, self.keys, version)

    def _forget_unused(self, contents: set[str]) -> None:
        """Drop the cached compositions of contents no version serves any more; a cache left as it was
        (Redis lost after the write) is only a cache: its LRU removes those results in time."""
        try:
            self.compositions.drop_made_from(self.unused(contents))
        except UnavailableError as exc:
            log.warning("cached compositions of %d deleted contents left to the LRU: %s", len(contents), exc)

    def unused(self, contents: Iterable[str]) -> list[str]:
        """The content ids among ``contents`` that no stored version serves."""
        contents = sorted(set(contents))
        with self._guard("unused"), self.r.pipeline(transaction=False) as pipe:
            for c in contents:
                pipe.scard(self.keys.content(c))
            return [c for c, n in zip(contents, pipe.execute()) if not n]

    # ---- reads --------------------------------------------------------------------
    def resolve(self, ref: str) -> tuple[str, int]:
        name, version = parse_ref(ref)
        with self._guard("resolve"):
            if version is None:
                latest = self.r.get(self.keys.skill(name, "latest"))
                if latest is None:
                    raise NotFoundError(f"skill {name!r} does not exist", param="model")
                return name, int(latest)
            if self.r.zscore(self.keys.skill(name, "versions"), str(version)) is None:
                raise NotFoundError(f"skill {ref!r} does not exist", param="model")
            return name, version

    def info(self, ref: str) -> SkillInfo:
        name, version = self.resolve(ref)
        with self._guard("info"):
            raw = self.r.hget(self.keys.version(name, version), "meta")
        if raw is None:  # deleted between resolve and read
            raise NotFoundError(f"skill {ref!r} does not exist", param="model")
        return read_meta(raw)

    def load(self, ref: str) -> tuple[SkillInfo, LoraAdapter]:
        """The version's adapter as it is served: exact, or decoded from its shards."""
        name, version = self.resolve(ref)
        for _ in range(3):
            with self._guard("load"):
                meta, config, weights, shards = self.r.hmget(
                    self.keys.version(name, version), ["meta", "config", "weights", "shards"])
                if meta is None:
                    raise NotFoundError(f"skill {ref!r} does not exist", param="model")
                if weights is not None:
                    return read_meta(meta), LoraAdapter.from_bytes(config, weights)
                encoded = mos.Encoded.from_bytes(shards)
                pools = self._shards.pools(encoded.pool_version)
            if pools is not None:
                return read_meta(meta), mos.decode(encoded, pools[0])
            # re-encoded by a compression since it was read, and its old pools collected: read again
        raise UnavailableError(f"skill {ref!r}: its shard pools keep changing; try again")

    def original(self, ref: str) -> LoraAdapter | None:
        """The uploaded adapter bit for bit, when the registry has it (stored exact, or --keep-originals)."""
        name, version = self.resolve(ref)
        with self._guard("original"):
            info, config, weights, original = self.r.hmget(
                self.keys.version(name, version), ["meta", "config", "weights", "original"])
        if info is None:
            raise NotFoundError(f"skill {ref!r} does not exist", param="model")
        if original is not None:
            return LoraAdapter.from_bytes(config, original)
        if weights is not None and not (read_meta(info).mos or {}).get("error"):
            return LoraAdapter.from_bytes(config, weights)
        return None

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except NotFoundError:
            return False

    def names(self) -> list[str]:
        with self._guard("names"):
            return sorted(n.decode() for n in self.r.smembers(self.keys.names))

    def list(self, after: str | None = None, limit: int | None = None,
             namespace: str | None = None) -> list[SkillInfo]:
        """The latest version of every skill, by name; a page of them with ``after`` (names after this one)
        and ``limit``, only ``namespace``'s with ``namespace``. Three round trips, whatever the library's size."""
        with self._guard("list"):
            names = sorted(n.decode() for n in self.r.smembers(self.keys.names))
            if after is not None:
                names = names[bisect.bisect_right(names, after):]
            if namespace is not None:
                names = [n for n in names if in_namespace(n, namespace)]
            names = names[:limit] if limit is not None else names
            return [info for info in self._latest(names) if info is not None]

    def latest(self, names: Iterable[str]) -> dict[str, SkillInfo | None]:
        """The latest version of each of ``names`` (None: no such skill). Two round trips."""
        names = list(names)
        with self._guard("latest"):
            return dict(zip(names, self._latest(names)))

    def _latest(self, names: list[str]) -> list[SkillInfo | None]:
        latest = self._pipelined([("get", self.keys.skill(n, "latest")) for n in names])
        found = [(i, n, int(v)) for i, (n, v) in enumerate(zip(names, latest)) if v is not None]  # None: deleted
        raws = self._pipelined([("hget", self.keys.version(n, v), "meta") for _, n, v in found])
        out: list[SkillInfo | None] = [None] * len(names)
        for (i, _, _), raw in zip(found, raws):
            out[i] = read_meta(raw) if raw is not None else None
        return out

    def mark(self) -> tuple[int, str | None]:
        """The generation now and the id of its entry in the change log (None: no entry, e.g. nothing
        written yet, or written before the log was kept), read together: where a reader is in the history."""
        with self._guard("mark"), self.r.pipeline(transaction=True) as pipe:
            now, last = pipe.get(self.keys.gen).lindex(self.keys.changes, -1).execute()
        return int(now or 0), json.loads(last).get("id") if last is not None else None

    def changes_since(self, generation: int, mark: str | None) -> Changes:
        """Every change after ``generation`` (whose log entry had id ``mark``, see :meth:`mark`), oldest first,
        as (event, ref): ``add``/``delete``/``recode`` of a skill ref, ``pools`` of a pool version. Its
        ``changes`` are None when the log cannot say: more than ``CHANGE_LOG`` changes ago, a log written
        before the entry ``mark`` names (a flushed or restarted Redis, even one written up to the same
        generation again), or a change made without an entry (older code): read everything again."""
        with self._guard("changes_since"):
            now, log = self._changes_script(keys=[self.keys.gen, self.keys.changes], args=[generation, CHANGE_LOG])
        now = int(now)
        entries = [json.loads(e) for e in log or []]
        if mark is None and generation == 0:  # a reader from the very start: the whole log, nothing before it
            known = log is not None and len(entries) == now
        else:  # the reader's own entry first, then what it missed
            known = log is not None and mark is not None and len(entries) == now - generation + 1 \
                and entries[0].get("id") == mark
            entries = entries[1:]
        if not known:
            return Changes(now, None, None)
        return Changes(now, entries[-1].get("id") if entries else mark, [(e["event"], e["ref"]) for e in entries])

    def versions(self, name: str) -> list[SkillInfo]:
        with self._guard("versions"):
            have = [int(v) for v in self.r.zrange(self.keys.skill(name, "versions"), 0, -1)]
            if not have:
                raise NotFoundError(f"skill {name!r} does not exist", param="name")
            raws = self._pipelined([("hget", self.keys.version(name, v), "meta") for v in have])
        return [read_meta(raw) for raw in raws if raw is not None]

    def all_versions(self) -> list[tuple[str, int]]:
        with self._guard("all_versions"):
            names = sorted(n.decode() for n in self.r.smembers(self.keys.names))
            ranges = self._pipelined([("zrange", self.keys.skill(n, "versions"), 0, -1) for n in names])
        return [(n, int(v)) for n, versions in zip(names, ranges) for v in versions]

    def _pipelined(self, commands: list[tuple]) -> list:
        """The replies to ``commands`` (method name, args…), sent in one round trip (not a transaction)."""
        pipe = self.r.pipeline(transaction=False)
        for method, *args in commands:
            getattr(pipe, method)(*args)
        return pipe.execute() if commands else []

    def generation(self) -> int:
        with self._guard("generation"):
            return int(self.r.get(self.keys.gen) or 0)

    def upgrade(self) -> dict[str, int]:
        """Bring data written before the content index and the composition budget under them (idempotent;
        run at server start): every version listed under its content id, every cached composition counted."""
        with self._guard("upgrade"):
            indexed = 0
            if not self.r.get(self.keys.content_index):
                for name, version in self.all_versions():
                    raw = self.r.hget(self.keys.version(name, version), "meta")
                    if raw is not None:
                        info = read_meta(raw)
                        indexed += self.r.sadd(self.keys.content(info.content_id), info.ref)
                self.r.set(self.keys.content_index, 1)
            return {"versions_indexed": indexed, "compositions_adopted": self._compositions.adopt_untracked()}

    # ---- MoS shard storage (shard_store.py) ---------------------------------------------
    def recode(self, name: str, version: int) -> SkillInfo | None:
        """Store one version against the current pools (shards, or exact when over budget or when no pools
        are current), in its own transaction: readers see the old form or the new, never a mix.
        None when the version was deleted meanwhile."""
        with self._guard("recode"):
            info, was = self._shards.recode(name, version)
            if was is not None and info is not None and was != info.content_id:
                self._forget_unused({was})
            return info

    def gc_pools(self) -> list[int]:
        """Delete pool versions that neither the current pointer nor any stored version names."""
        with self._guard("gc_pools"):
            return self._shards.gc(self.all_versions)

    def storage_bytes_of(self, name: str, version: int) -> dict[str, int]:
        with self._guard("storage_bytes"):
            return self._shards.version_bytes(name, version)

    def storage_bytes(self) -> dict:
        """Bytes of weights as stored: per version {weights, shards, original}, and the pools'."""
        with self._guard("storage_bytes"):
            versions = {f"{n}@{v}": self.storage_bytes_of(n, v) for n, v in self.all_versions()}
            return {"versions": versions, "pools": self._shards.pool_bytes()}


__all__ = ["Registry"]
