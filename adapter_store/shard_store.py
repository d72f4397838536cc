"""MoS shard storage in Redis: the pool versions, which one is current, how a version's weights are
stored against them, re-encoding (recode), collecting unnamed pools, byte accounting, the compression lock.

The math is in adapter_store/mos.py, the whole-library run in adapter_store/compression.py. Each
shard-form version names the pool version it was encoded against, and pools are deleted only once no
version names them, so a reader always decodes against the pools its version was written for.
Callers (the :class:`~adapter_store.registry.Registry`) wrap these calls in the registry's guard.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cachetools
import redis

from adapter_store import mos
from lora.adapter import LoraAdapter
from lora.errors import MosaicError, UnavailableError
from adapter_store.layout import KeyLayout, announce
from adapter_store.skill_info import SkillInfo, read_meta

Current = tuple[int, "mos.Pools | None", dict]  # (pool version or 0, its pools, the options they were built with)


@dataclass
class Stored:
    """How one version's weights are stored: the hash ``fields``, its ``mos`` metadata, and the pool
    version (0: none) that was current when it was encoded (``against``)."""

    against: int
    fields: dict[str, bytes]
    meta: dict | None


def _exact_meta(weights: bytes, error: float) -> dict:
    return {"pool_version": None, "error": error, "bytes": len(weights),
            "sha256": hashlib.sha256(weights).hexdigest() if error else None}


class ShardStore:
    def __init__(self, client: redis.Redis, keys: KeyLayout, cached_pools: int = 8) -> None:
        self.r, self.keys = client, keys
        # pool versions are immutable, so cached; a long-lived process sees many refreshes
        self.cache: cachetools.LRUCache[int, tuple[mos.Pools, dict]] = cachetools.LRUCache(maxsize=cached_pools)
        self._lock = threading.Lock()  # request threads and a compression job share one registry

    # ---- pools ------------------------------------------------------------------------
    def pools(self, version: int) -> tuple[mos.Pools, dict] | None:
        """Pools of ``version`` and the options they were built with; None if gone."""
        with self._lock:
            if (hit := self.cache.get(version)) is not None:
                return hit
        codewords, options = self.r.hmget(self.keys.pool(version), ["codewords", "options"])
        if codewords is None:
            return None
        pools = (mos.Pools.from_bytes(codewords), json.loads(options))
        with self._lock:
            self.cache[version] = pools
        return pools

    def current(self) -> Current:
        """The pools uploads are encoded against now: (0, None, {}) when storage is exact."""
        current = int(self.r.get(self.keys.pools_current) or 0)
        if not current:
            return 0, None, {}
        pools = self.pools(current)
        if pools is None:  # the pointer names pools that are not there: refuse rather than guess
            raise UnavailableError(f"the current shard pools (v{current}) are missing from the registry")
        return (current, *pools)

    def compression(self) -> dict | None:
        """The current pool version and the options it was built with; None when storage is exact."""
        version, pools, options = self.current()
        return None if pools is None else {"pool_version": version, **options, "pool_bytes": pools.nbytes()}

    def put_pools(self, pools: mos.Pools, options: dict) -> int:
        """Store ``pools`` as a new version and make it current."""
        version = int(self.r.incr(self.keys.pools_next))
        pools.version = version
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.pool(version), mapping={"codewords": pools.to_bytes(), "options": json.dumps(options)})
            pipe.set(self.keys.pools_current, version)
            announce(pipe, self.keys, "pools", f"v{version}")
            pipe.execute()
        return version

    def stop(self) -> None:
        """No pools are current: uploads are stored exact from now on."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.pools_current)
            announce(pipe, self.keys, "pools", "none")
            pipe.execute()

    # ---- how a version is stored ---------------------------------------------------------
    def storage(self, current: Current, adapter: LoraAdapter, weights: bytes,
                original: bytes | None = None, base_error: float = 0.0) -> Stored:
        """The hash fields that store ``adapter`` under the ``current`` pools: shards within the error budget,
        else exact. ``base_error`` is the error ``adapter`` already carries against the upload (it was
        decoded from shards): errors add, ‖ΔW − ΔŴ₂‖ ≤ ‖ΔW − ΔŴ₁‖ + ‖ΔŴ₁ − ΔŴ₂‖."""
        version, pools, options = current
        if pools is None:
            return Stored(0, {"weights": weights}, None if not base_error else _exact_meta(weights, base_error))
        budget = (options["error_budget"] - base_error) / (1 + base_error)
        encoded = mos.encode(adapter, pools, budget, options["max_private"]) if budget > 0 else None
        if encoded is None:
            meta = _exact_meta(weights, base_error)
            meta["note"] = f"over the error budget {options['error_budget']:g} with pools v{version}: stored exact"
            meta["exact_under"] = version
            return Stored(version, {"weights": weights}, meta)
        blob = encoded.to_bytes(pools.pool_size)
        fields = {"shards": blob}
        if options.get("keep_originals") and (original or not base_error):
            fields["original"] = original or weights
        meta = {"pool_version": version, "error": base_error + encoded.error * (1 + base_error),
                "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                "private": round(encoded.private_fraction(), 4)}
        return Stored(version, fields, meta)

    def recode(self, name: str, version: int) -> tuple[SkillInfo | None, str | None]:
        """Store one version against the current pools, in its own WATCH/MULTI transaction (readers see
        the old form or the new, never a mix). Returns its info (None when it was deleted meanwhile) and,
        when it was stored anew, the content id it had before."""
        key = self.keys.version(name, version)

        def move(pipe: redis.client.Pipeline) -> tuple[SkillInfo | None, str | None]:
            raw, config, weights, shards, original = pipe.hmget(key, ["meta", "config", "weights", "shards", "original"])
            if raw is None:
                return None, None
            info, current = read_meta(raw), self.current()
            done = info.mos or {}
            if current[0] and current[0] in (done.get("pool_version"), done.get("exact_under")):
                return info, None
            if not current[0] and not done.get("pool_version"):
                return info, None  # already exact
            if original is not None or (weights is not None and not done.get("error")):
                source, base_error = LoraAdapter.from_bytes(config, original or weights), 0.0
            elif weights is not None:  # decoded shards stored exact by an earlier run
                source, base_error = LoraAdapter.from_bytes(config, weights), float(done["error"])
            else:
                encoded = mos.Encoded.from_bytes(shards)
                pools = self.pools(encoded.pool_version)
                if pools is None:
                    raise MosaicError(f"{info.ref}: pools v{encoded.pool_version} are missing")
                source, base_error = mos.decode(encoded, pools[0]), float(done.get("error", 0.0))
            stored = self.storage(current, source, source.weights_bytes(), original, base_error)
            if current[0] and base_error and "weights" in stored.fields and done.get("pool_version"):
                # decoded shards that cannot meet the budget again: stored exact they would grow
                # many times over, so they stay on the pools they name (kept while named)
                return info, None
            was, info = info.content_id, info.model_copy(update={"mos": stored.meta})
            pipe.multi()
            pipe.srem(self.keys.content(was), info.ref)
            pipe.sadd(self.keys.content(info.content_id), info.ref)
            # the config goes with the weights: decoded factors have the scaling folded in (r = alpha)
            pipe.hset(key, mapping={"meta": info.model_dump_json(), "config": source.config_bytes(), **stored.fields})
            if stale := {"weights", "shards", "original"} - set(stored.fields):
                pipe.hdel(key, *stale)
            announce(pipe, self.keys, "recode", info.ref)
            return info, was

        return self.r.transaction(move, key, self.keys.pools_current, value_from_callable=True)

    # ---- collection, accounting, the lock -------------------------------------------------
    def gc(self, all_versions: Callable[[], list[tuple[str, int]]]) -> list[int]:
        """Delete pool versions that neither the current pointer nor any stored version names."""
        current = int(self.r.get(self.keys.pools_current) or 0)
        newest = int(self.r.get(self.keys.pools_next) or 0)  # pools made after this call are never touched
        keep = {current}
        for name, version in all_versions():
            raw = self.r.hget(self.keys.version(name, version), "meta")
            if raw is not None:
                keep.add(int((read_meta(raw).mos or {}).get("pool_version") or 0))
        gone = []
        for key in self.r.scan_iter(match=self.keys.pool("*")):
            version = self.keys.pool_version_of(key)
            if version not in keep and version <= newest:
                self.r.delete(key)
                gone.append(version)
        return sorted(gone)

    def version_bytes(self, name: str, version: int) -> dict[str, int]:
        """Bytes stored for one version: {weights, shards, original}."""
        fields = ("weights", "shards", "original")
        return dict(zip(fields, (self.r.hstrlen(self.keys.version(name, version), f) for f in fields)))

    def pool_bytes(self) -> int:
        return sum(self.r.hstrlen(k, "codewords") for k in self.r.scan_iter(match=self.keys.pool("*")))

    def running(self) -> bool:
        return bool(self.r.exists(self.keys.compression_lock))

    def lock(self, seconds: float = 600):
        """A Redis lock (redis-py's) that one compression holds; extend it while working."""
        return self.r.lock(self.keys.compression_lock, timeout=seconds, blocking=False)


__all__ = ["Current", "ShardStore", "Stored"]
