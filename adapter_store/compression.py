"""Compress the whole library into MoS shard form (or refresh its pools), safely while it serves.

The order makes an interrupted run harmless:

1. learn new pools from the library (the uploaded originals where kept, else what is served);
2. store them as a new pool version and make it current — uploads are encoded against it from now on;
3. re-encode every version, each in its own WATCH/MULTI transaction (:meth:`Registry.recode`);
4. delete the pool versions no stored version names any more.

A run that dies after step 2 leaves some versions on the old pools and some on the new, every one
readable (each names its own pools, and old pools are only deleted in step 4); running it again
finishes the job. One run at a time (a Redis lock).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from pydantic import BaseModel, Field
from redis.exceptions import LockError

from adapter_store import mos
from lora.errors import ConflictError, InvalidRequestError, NotFoundError
from adapter_store.registry import Registry


class CompressOptions(BaseModel):
    shard_width: int = Field(4, ge=1, le=4096, description="values per shard (MoS vector sharding)")
    shards_per_vector: int | None = Field(None, ge=1, le=4096,
                                          description="MoS's l: cut every vector in l shards instead")
    pool_size: int = Field(256, ge=2, le=65536, description="shards per pool (one pool per projection and A/B)")
    # set so that at the default pools a typical skill needs no private shards and loses no measured task
    # quality (bench/reports/storage.md)
    error_budget: float = Field(0.35, gt=0, lt=1, description="largest relative ‖ΔW − ΔŴ‖_F per skill")
    max_private: float = Field(0.5, ge=0, le=1, description="largest share of a skill's shards stored privately")
    keep_originals: bool = Field(False, description="keep the uploaded weights beside the shards")
    fit_skills: int = Field(256, ge=1, description="learn the pools from at most this many versions (a sample)")
    seed: int = 0


class CompressReport(BaseModel):
    pool_version: int
    options: CompressOptions
    versions: list[dict]  # {ref, stored: "shards" | "exact", error, before, after}
    bytes_before: int
    bytes_after: int
    pool_bytes: int
    collected_pools: list[int]
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(1, self.bytes_after)


Progress = Callable[[str, int, int], None]  # (what, done, total)


@contextmanager
def _exclusive(registry: Registry) -> Iterator:
    """The registry's compression lock, or a ConflictError when another run holds it."""
    lock = registry.shards.lock()
    if not lock.acquire():
        raise ConflictError("a compression is already running")
    try:
        yield lock
    finally:
        # expired (LockNotOwnedError), or lost with the connection: nothing to release
        with contextlib.suppress(LockError, redis.ConnectionError, redis.TimeoutError):
            lock.release()


def _weights_bytes(sizes: dict) -> int:
    return sizes["weights"] + sizes["shards"] + sizes["original"]


def compress_library(registry: Registry, options: CompressOptions, progress: Progress | None = None,
                     fail_after: int | None = None) -> CompressReport:
    """Build new pools and re-encode every version against them. ``fail_after`` (tests only) stops
    the run with an error after that many versions, as a crash half-way would."""
    progress = progress or (lambda *_: None)
    t0 = time.perf_counter()
    with _exclusive(registry) as lock:
        before = registry.storage_bytes()
        refs = registry.all_versions()
        sample = random.Random(options.seed).sample(refs, min(len(refs), options.fit_skills))
        adapters = []
        for i, (name, version) in enumerate(sample):
            ref = f"{name}@{version}"
            try:
                adapters.append(registry.original(ref) or registry.load(ref)[1])
            except NotFoundError:  # deleted meanwhile
                pass
            progress("reading", i + 1, len(sample))
            lock.extend(600, replace_ttl=True)
        if not adapters:
            raise InvalidRequestError("the library is empty: there is nothing to learn shard pools from")
        progress("learning pools", 0, 1)
        pools = mos.build_pools(adapters, shard_width=options.shard_width, pool_size=options.pool_size,
                                seed=options.seed, shards_per_vector=options.shards_per_vector)
        del adapters
        version = registry.shards.put_pools(pools, options.model_dump())
        progress("learning pools", 1, 1)
        rows = []
        refs = registry.all_versions()  # uploads that came meanwhile are on the new pools already
        for i, (name, v) in enumerate(refs):
            if fail_after is not None and i >= fail_after:
                raise RuntimeError(f"compression stopped after {i} versions (fail_after)")
            info = registry.recode(name, v)
            lock.extend(600, replace_ttl=True)
            progress("encoding", i + 1, len(refs))
            if info is None:
                continue
            m = info.mos or {}
            rows.append({"ref": info.ref, "stored": "shards" if m.get("pool_version") else "exact",
                         "error": float(m.get("error", 0.0)), "private": m.get("private", 0.0)})
        collected = registry.gc_pools()
        after = registry.storage_bytes()
        rows = [row for row in rows if row["ref"] in after["versions"]]  # not deleted meanwhile
        for row in rows:
            row["after"] = _weights_bytes(after["versions"][row["ref"]])
            row["before"] = _weights_bytes(before["versions"][row["ref"]]) if row["ref"] in before["versions"] \
                else row["after"]
        return CompressReport(
            pool_version=version, options=options, versions=rows,
            bytes_before=sum(_weights_bytes(v) for v in before["versions"].values()) + before["pools"],
            bytes_after=sum(_weights_bytes(v) for v in after["versions"].values()) + after["pools"],
            pool_bytes=after["pools"], collected_pools=collected, seconds=time.perf_counter() - t0,
        )


def decompress_library(registry: Registry, progress: Progress | None = None) -> int:
    """Store every version exact again (the original where kept, else the decoded shards) and stop
    encoding uploads; returns how many versions changed form."""
    progress = progress or (lambda *_: None)
    with _exclusive(registry) as lock:
        registry.shards.stop()
        refs, changed = registry.all_versions(), 0
        for i, (name, version) in enumerate(refs):
            before = registry.storage_bytes_of(name, version)
            registry.recode(name, version)
            changed += before != registry.storage_bytes_of(name, version)
            lock.extend(600, replace_ttl=True)
            progress("decoding", i + 1, len(refs))
        registry.gc_pools()
        return changed
