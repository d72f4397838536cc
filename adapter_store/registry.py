"""The skill registry in Redis.

Layout (``P`` is the key prefix, so tests and deployments can share one Redis):

``P:names``                  SET of skill names
``P:s:NAME:versions``        ZSET of version numbers (score = version)
``P:s:NAME:latest``          the latest version number
``P:s:NAME:next``            the highest version ever handed out (kept when the skill is deleted:
                             numbers are never reused, so name@N always means the same content)
``P:s:NAME:v:N``             HASH {meta, config, weights} — one complete version; a version stored in
                             MoS shard form has ``shards`` (index tables into the pools) instead of
                             ``weights``, and ``original`` (the uploaded weights) with --keep-originals
``P:mos:pool:V``             HASH {codewords, options} — shard pools, version V (immutable once written)
``P:mos:current``            the pool version uploads are encoded against (absent: store exact)
``P:mos:next``               the highest pool version ever handed out
``P:mos:lock``               held while a compression runs (one at a time)
``P:gen``                    bumped on every change, so replicas can tell their caches are stale
``P:events``                 pub/sub channel announcing each change
``P:content:ID``             SET of the versions (name@N) whose served content id is ID (``P:content-index``
                             set once versions stored before this index was kept are listed in it)
``P:c:HASH``, ``P:cache:*``  cached composition results within a byte budget (adapter_store/composition_cache.py)
``P:engine-ids``             HASH served content key -> the engine's integer id (``P:engine-ids:next``
                             the last one handed out): one id per content, the same on every replica

Every write is one MULTI/EXEC transaction guarded by WATCH, so a reader sees a version
completely or not at all, and a write that fails before EXEC leaves nothing behind. Each shard-form
version names the pool version it was encoded against, and pools are deleted only once no version
names them, so a reader always decodes against the pools its version was written for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import redis
from pydantic import BaseModel, Field, computed_field

from adapter_store import mos
from adapter_store.adapter import LoraAdapter, content_id
from adapter_store.composition_cache import CompositionCache
from adapter_store.errors import InvalidRequestError, MosaicError, NotFoundError, UnavailableError

log = logging.getLogger("mosaic.registry")


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
    # how the weights are stored when a shard encoding is on: {"pool_version": V or None (kept exact),
    # "error": relative ‖ΔW − ΔŴ‖_F against the upload, "bytes": stored bytes, "sha256": of them, ...}
    mos: dict | None = None
    config_sha256: str = ""  # of the ΔW-relevant config (adapter.normalised_config)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @computed_field
    @property
    def content_id(self) -> str:
        """The identity of what is served: the weights (the upload's, or the shard encoding that
        replaced them: re-encoding changes the weights served) together with the ΔW-relevant config.
        Engine folders, engine ids and composition caches are named by it."""
        return content_id((self.mos or {}).get("sha256") or self.sha256, self.config_sha256)

    def same_content(self, adapter: LoraAdapter) -> bool:
        """Whether ``adapter`` is what this version was made from (weights and ΔW-relevant config)."""
        return self.sha256 == adapter.sha256() and self.config_sha256 == adapter.config_sha256()


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    name, sep, ver = ref.partition("@")
    if not sep:
        return name, None
    if not (ver.isascii() and ver.isdigit()) or int(ver) < 1:  # str.isdigit() also accepts "²"
        raise InvalidRequestError(f"bad skill reference {ref!r}: the version after '@' must be a positive integer")
    return name, int(ver)


class Registry:
    def __init__(self, client: redis.Redis, prefix: str = "mosaic",
                 observer: Callable[[str, str], None] | None = None,
                 composition_cache_bytes: int = 1 << 30) -> None:
        self.r = client
        self.p = prefix
        self.compositions = CompositionCache(client, prefix, composition_cache_bytes)
        self.observer = observer  # called with (operation, "ok" | "rejected" | "unavailable" | "error") after each one
        self._pool_cache: OrderedDict[int, tuple[mos.Pools, dict]] = OrderedDict()  # least recently used first
        self._pool_lock = threading.Lock()  # request threads and a compression job share one registry

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
            stored = self._storage(self._current_pools(), adapter, weights)
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._k("s", name, "next"), self._k("mos", "current"))
                        if int(pipe.get(self._k("mos", "current")) or 0) != stored.against:
                            pipe.unwatch()  # the pools changed since it was encoded: encode again
                            stored = self._storage(self._current_pools(), adapter, weights)
                            continue  # (each pass follows a real pool change: a compression is seconds apart)
                        version = int(pipe.get(self._k("s", name, "next")) or 0) + 1
                        info = SkillInfo(
                            name=name,
                            version=version,
                            sha256=adapter.sha256(),
                            config_sha256=adapter.config_sha256(),
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
                            mos=stored.meta,
                        )
                        pipe.multi()
                        pipe.hset(
                            self._vkey(name, version),
                            mapping={"meta": info.model_dump_json(), "config": config, **stored.fields},
                        )
                        self._step("version-written")
                        pipe.zadd(self._k("s", name, "versions"), {str(version): version})
                        pipe.set(self._k("s", name, "next"), version)
                        pipe.set(self._k("s", name, "latest"), version)
                        self._step("pointers-written")
                        pipe.sadd(self._k("names"), name)
                        pipe.sadd(self._k("content", info.content_id), info.ref)
                        self._announce(pipe, "add", info.ref)
                        pipe.execute()
                        return info
                    except redis.WatchError:
                        continue

    def delete(self, ref: str) -> list[SkillInfo]:
        """Delete one version (``name@N``) or every version of a skill (``name``), and the cached
        compositions made from a content that no version has any more."""
        infos = self._delete(ref)
        self._forget_unused({i.content_id for i in infos})
        return infos

    def _forget_unused(self, contents: set[str]) -> None:
        """Drop the cached compositions of contents no version serves any more; a cache left as it was
        (Redis lost after the write) is only a cache: its LRU removes those results in time."""
        try:
            self.forget_compositions(self.unused(contents))
        except UnavailableError as exc:
            log.warning("cached compositions of %d deleted contents left to the LRU: %s", len(contents), exc)

    def unused(self, contents: Iterable[str]) -> list[str]:
        """The content ids among ``contents`` that no stored version serves."""
        contents = sorted(set(contents))
        with self._guard("unused"), self.r.pipeline(transaction=False) as pipe:
            for c in contents:
                pipe.scard(self._k("content", c))
            return [c for c, n in zip(contents, pipe.execute()) if not n]

    def forget_compositions(self, contents: list[str]) -> list[str]:
        """Drop the cached compositions made from any of ``contents``; returns their keys."""
        with self._guard("forget_compositions"):
            return self.compositions.drop_made_from(contents)

    def _delete(self, ref: str) -> list[SkillInfo]:
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
                        pipe.watch(*[self._vkey(name, v) for v in doomed])  # a recode in between: read again
                        infos = [self._meta(pipe.hget(self._vkey(name, v), "meta")) for v in doomed]
                        remaining = [v for v in have if v not in doomed]
                        pipe.multi()
                        pipe.delete(*[self._vkey(name, v) for v in doomed])
                        for info in infos:
                            pipe.srem(self._k("content", info.content_id), info.ref)
                        if remaining:
                            pipe.zrem(self._k("s", name, "versions"), *map(str, doomed))
                            pipe.set(self._k("s", name, "latest"), max(remaining))
                        else:
                            # "next" stays: a name deleted and uploaded again goes on counting, so a
                            # client pinned to name@N never gets other weights under it
                            pipe.delete(self._k("s", name, "versions"), self._k("s", name, "latest"))
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
        """The version's adapter as it is served: exact, or decoded from its shards."""
        name, version = self.resolve(ref)
        for _ in range(3):
            with self._guard("load"):
                meta, config, weights, shards = self.r.hmget(
                    self._vkey(name, version), ["meta", "config", "weights", "shards"])
                if meta is None:
                    raise NotFoundError(f"skill {ref!r} does not exist", param="model")
                if weights is not None:
                    return self._meta(meta), LoraAdapter.from_bytes(config, weights)
                encoded = mos.Encoded.from_bytes(shards)
                pools = self._pools(encoded.pool_version)
            if pools is not None:
                return self._meta(meta), mos.decode(encoded, pools[0])
            # re-encoded by a compression since it was read, and its old pools collected: read again
        raise UnavailableError(f"skill {ref!r}: its shard pools keep changing; try again")

    def original(self, ref: str) -> LoraAdapter | None:
        """The uploaded adapter bit for bit, when the registry has it (stored exact, or --keep-originals)."""
        name, version = self.resolve(ref)
        with self._guard("original"):
            info, config, weights, original = self.r.hmget(
                self._vkey(name, version), ["meta", "config", "weights", "original"])
        if info is None:
            raise NotFoundError(f"skill {ref!r} does not exist", param="model")
        if original is not None:
            return LoraAdapter.from_bytes(config, original)
        if weights is not None and not (self._meta(info).mos or {}).get("error"):
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
    def put_composition(self, key: str, adapter: LoraAdapter, meta: dict, inputs: list[str]) -> list[str]:
        """Cache a composition made from the contents ``inputs``; returns the keys evicted to fit the budget."""
        with self._guard("put_composition"):
            return self.compositions.put(key, adapter, meta, inputs)

    def get_composition(self, key: str) -> tuple[dict, LoraAdapter] | None:
        with self._guard("get_composition"):
            return self.compositions.get(key)

    def upgrade(self) -> dict[str, int]:
        """Bring data written before the content index and the composition budget under them (idempotent;
        run at server start): every version listed under its content id, every cached composition counted."""
        with self._guard("upgrade"):
            indexed = 0
            if not self.r.get(self._k("content-index")):
                for name, version in self.all_versions():
                    raw = self.r.hget(self._vkey(name, version), "meta")
                    if raw is not None:
                        info = self._meta(raw)
                        indexed += self.r.sadd(self._k("content", info.content_id), info.ref)
                self.r.set(self._k("content-index"), 1)
            return {"versions_indexed": indexed, "compositions_adopted": self.compositions.adopt_untracked()}

    # ---- engine ids ---------------------------------------------------------------------
    def engine_id(self, key: str, above: int = 0) -> int:
        """The engine's integer id for the served content ``key`` (a content id or a composition key):
        handed out by a counter, so every replica agrees and no two contents ever share an id.
        ``above``: the caller's engine already uses ids up to this one for other content (Redis lost
        its ids, e.g. a restart without persistence): the counter moves past it and ``key`` gets a new id."""
        ids = self._k("engine-ids")
        with self._guard("engine_id"):
            if above:
                self.r.transaction(lambda pipe: self._move_counter(pipe, above, key), self._k("engine-ids", "next"))
            got = self.r.hget(ids, key)
            if got is None:
                self.r.hsetnx(ids, key, self.r.incr(self._k("engine-ids", "next")))  # a racing replica's wins
                got = self.r.hget(ids, key)
            return int(got)

    def _move_counter(self, pipe: redis.client.Pipeline, above: int, key: str) -> None:
        current = int(pipe.get(self._k("engine-ids", "next")) or 0)
        pipe.multi()
        if current < above:
            pipe.set(self._k("engine-ids", "next"), above)
        pipe.hdel(self._k("engine-ids"), key)

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

    # ---- MoS shard storage (math in adapter_store/mos.py, the whole-library run in compression.py) --
    def _pools(self, version: int) -> tuple[mos.Pools, dict] | None:
        """Pools of ``version`` and the options they were built with (immutable, so cached); None if gone."""
        with self._pool_lock:
            if version in self._pool_cache:
                self._pool_cache.move_to_end(version)
                return self._pool_cache[version]
        codewords, options = self.r.hmget(self._k("mos", "pool", version), ["codewords", "options"])
        if codewords is None:
            return None
        pools = (mos.Pools.from_bytes(codewords), json.loads(options))
        with self._pool_lock:
            self._pool_cache[version] = pools
            while len(self._pool_cache) > 8:  # a long-lived process sees many refreshes
                self._pool_cache.popitem(last=False)
        return pools

    def _current_pools(self) -> tuple[int, mos.Pools | None, dict]:
        current = int(self.r.get(self._k("mos", "current")) or 0)
        if not current:
            return 0, None, {}
        pools = self._pools(current)
        if pools is None:  # the pointer names pools that are not there: refuse rather than guess
            raise UnavailableError(f"the current shard pools (v{current}) are missing from the registry")
        return (current, *pools)

    def _storage(self, current: tuple[int, mos.Pools | None, dict], adapter: LoraAdapter, weights: bytes,
                 original: bytes | None = None, base_error: float = 0.0) -> "_Stored":
        """The hash fields that store ``adapter`` under the current pools: shards within the error budget,
        else exact. ``base_error`` is the error ``adapter`` already carries against the upload (it was
        decoded from shards): errors add, ‖ΔW − ΔŴ₂‖ ≤ ‖ΔW − ΔŴ₁‖ + ‖ΔŴ₁ − ΔŴ₂‖."""
        version, pools, options = current
        if pools is None:
            return _Stored(0, {"weights": weights}, None if not base_error else _exact_meta(weights, base_error))
        budget = (options["error_budget"] - base_error) / (1 + base_error)
        encoded = mos.encode(adapter, pools, budget, options["max_private"]) if budget > 0 else None
        if encoded is None:
            meta = _exact_meta(weights, base_error)
            meta["note"] = f"over the error budget {options['error_budget']:g} with pools v{version}: stored exact"
            meta["exact_under"] = version
            return _Stored(version, {"weights": weights}, meta)
        blob = encoded.to_bytes(pools.pool_size)
        fields = {"shards": blob}
        if options.get("keep_originals") and (original or not base_error):
            fields["original"] = original or weights
        meta = {"pool_version": version, "error": base_error + encoded.error * (1 + base_error),
                "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                "private": round(encoded.private_fraction(), 4)}
        return _Stored(version, fields, meta)

    def compression(self) -> dict | None:
        """The current pool version and the options it was built with; None when storage is exact."""
        version, pools, options = self._current_pools()
        return None if pools is None else {"pool_version": version, **options, "pool_bytes": pools.nbytes()}

    def put_pools(self, pools: mos.Pools, options: dict) -> int:
        """Store ``pools`` as a new version and make it current (uploads are encoded against it from now on);
        versions encoded against older pools stay readable until :meth:`recode` moves them."""
        with self._guard("put_pools"):
            version = int(self.r.incr(self._k("mos", "next")))
            pools.version = version
            with self.r.pipeline(transaction=True) as pipe:
                pipe.hset(self._k("mos", "pool", version), mapping={"codewords": pools.to_bytes(),
                                                                    "options": json.dumps(options)})
                pipe.set(self._k("mos", "current"), version)
                self._announce(pipe, "pools", f"v{version}")
                pipe.execute()
            return version

    def stop_compression(self) -> None:
        """Uploads are stored exact from now on (versions already in shard form stay so until recoded)."""
        with self._guard("stop_compression"), self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("mos", "current"))
            self._announce(pipe, "pools", "none")
            pipe.execute()

    def all_versions(self) -> list[tuple[str, int]]:
        with self._guard("all_versions"):
            return [(n, int(v)) for n in self.names() for v in self.r.zrange(self._k("s", n, "versions"), 0, -1)]

    def recode(self, name: str, version: int) -> SkillInfo | None:
        """Store one version against the current pools (shards, or exact when over budget or when no pools
        are current), in its own transaction: readers see the old form or the new, never a mix.
        None when the version was deleted meanwhile."""
        key, current_key = self._vkey(name, version), self._k("mos", "current")
        with self._guard("recode"), self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key, current_key)
                    raw, config, weights, shards, original = pipe.hmget(
                        key, ["meta", "config", "weights", "shards", "original"])
                    if raw is None:
                        return None
                    info, current = self._meta(raw), self._current_pools()
                    done = info.mos or {}
                    if current[0] and current[0] in (done.get("pool_version"), done.get("exact_under")):
                        return info
                    if not current[0] and not done.get("pool_version"):
                        return info  # already exact
                    if original is not None or (weights is not None and not done.get("error")):
                        source, base_error = LoraAdapter.from_bytes(config, original or weights), 0.0
                    elif weights is not None:  # decoded shards stored exact by an earlier run
                        source, base_error = LoraAdapter.from_bytes(config, weights), float(done["error"])
                    else:
                        encoded = mos.Encoded.from_bytes(shards)
                        pools = self._pools(encoded.pool_version)
                        if pools is None:
                            raise MosaicError(f"{info.ref}: pools v{encoded.pool_version} are missing")
                        source, base_error = mos.decode(encoded, pools[0]), float(done.get("error", 0.0))
                    stored = self._storage(current, source, source.weights_bytes(), original, base_error)
                    if current[0] and base_error and "weights" in stored.fields and done.get("pool_version"):
                        # decoded shards that cannot meet the budget again: stored exact they would grow
                        # many times over, so they stay on the pools they name (kept while named)
                        return info
                    was, info = info.content_id, info.model_copy(update={"mos": stored.meta})
                    pipe.multi()
                    pipe.srem(self._k("content", was), info.ref)
                    pipe.sadd(self._k("content", info.content_id), info.ref)
                    # the config goes with the weights: decoded factors have the scaling folded in (r = alpha)
                    pipe.hset(key, mapping={"meta": info.model_dump_json(), "config": source.config_bytes(),
                                            **stored.fields})
                    if stale := {"weights", "shards", "original"} - set(stored.fields):
                        pipe.hdel(key, *stale)
                    self._announce(pipe, "recode", info.ref)
                    pipe.execute()
                    if was != info.content_id:
                        self._forget_unused({was})
                    return info
                except redis.WatchError:
                    continue

    def gc_pools(self) -> list[int]:
        """Delete pool versions that neither the current pointer nor any stored version names."""
        with self._guard("gc_pools"):
            current = int(self.r.get(self._k("mos", "current")) or 0)
            newest = int(self.r.get(self._k("mos", "next")) or 0)  # pools made after this call are never touched
            keep = {current}
            for name, version in self.all_versions():
                raw = self.r.hget(self._vkey(name, version), "meta")
                if raw is not None:
                    keep.add(int((self._meta(raw).mos or {}).get("pool_version") or 0))
            gone = []
            for key in self.r.scan_iter(match=self._k("mos", "pool", "*")):
                version = int(key.decode().rsplit(":", 1)[-1])
                if version not in keep and version <= newest:
                    self.r.delete(key)
                    gone.append(version)
            return sorted(gone)

    def storage_bytes_of(self, name: str, version: int) -> dict[str, int]:
        fields = ("weights", "shards", "original")
        with self._guard("storage_bytes"):
            return dict(zip(fields, (self.r.hstrlen(self._vkey(name, version), f) for f in fields)))

    def storage_bytes(self) -> dict:
        """Bytes of weights as stored: per version {weights, shards, original}, and the pools'."""
        with self._guard("storage_bytes"):
            versions = {f"{n}@{v}": self.storage_bytes_of(n, v) for n, v in self.all_versions()}
            pools = sum(self.r.hstrlen(k, "codewords") for k in self.r.scan_iter(match=self._k("mos", "pool", "*")))
            return {"versions": versions, "pools": pools}

    def compression_running(self) -> bool:
        with self._guard("compression_running"):
            return bool(self.r.exists(self._k("mos", "lock")))

    def compression_lock(self, seconds: float = 600):
        """A Redis lock (redis-py's) that one compression holds; extend it while working."""
        return self.r.lock(self._k("mos", "lock"), timeout=seconds, blocking=False)

    # ---- helpers ------------------------------------------------------------------
    @staticmethod
    def _meta(raw: bytes | None) -> SkillInfo:
        if raw is None:
            raise NotFoundError("skill vanished while it was read", param="model")
        return SkillInfo.model_validate_json(raw)

    def _guard(self, op: str):
        return _RedisGuard(op, self.observer)


class _Stored:
    """How one version's weights are stored: the hash fields, its ``mos`` metadata, and the pool
    version (0: none) that was current when it was encoded."""

    def __init__(self, against: int, fields: dict[str, bytes], meta: dict | None) -> None:
        self.against, self.fields, self.meta = against, fields, meta


def _exact_meta(weights: bytes, error: float) -> dict:
    return {"pool_version": None, "error": error, "bytes": len(weights),
            "sha256": hashlib.sha256(weights).hexdigest() if error else None}


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
        if lost:  # the connection's details go to the log, not to clients
            log.warning("Redis unavailable during %s: %s", self.op, exc)
            raise UnavailableError("the skill registry (Redis) is unavailable; try again shortly") from exc
        return False


__all__ = ["Registry", "SkillInfo", "parse_ref"]
