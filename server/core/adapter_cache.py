"""Engine-ready adapter folders: skills by content hash, compositions by composition hash.

Everything here is named by content, so a name that gets a new version can never serve a
stale folder, and every replica computes the same folder name; the engine's ``lora_int_id`` for a
folder comes from a Redis counter (``Registry.engine_ids``), the same on every replica.
A composition is computed once: the result goes to Redis (for other replicas) and to local
disk (for the engine); concurrent first requests for the same key wait for one computation.
Both are bounded: Redis by MOSAIC_COMPOSITION_CACHE_MB (adapter_store/composition_cache.py), the
folders by MOSAIC_ADAPTER_DISK_MB (server/core/folders.py), least recently used out first, never one in
use (the adapter handed out holds its folder on disk while it lives); deleting a skill removes what only
it used. The in-memory maps are bounded too (``MEMO``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo
from composer import Composition
from lora.adapter import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter
from lora.errors import UnavailableError
from server.core import metrics
from server.core.compose_budget import ComposeBudget, Composer
from server.core.engine import EngineAdapter
from server.core.folders import Folders, Hold

MEMO = 10_000  # entries kept per in-memory map (refs resolved, engine ids)


@dataclass(frozen=True)
class HeldAdapter(EngineAdapter):
    """An adapter whose folder stays on disk while this object lives (or until ``hold.release()``): a request
    that keeps it until its response is sent never has its folder removed under it (server/core/folders.py)."""

    hold: Hold | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Target:
    """The adapter that serves a plan, decided in one place (server/core/planner.py ``target_for``): one skill, or
    one composition, with the skill versions it was decided from and its key, which names its folder, its engine id
    and, under Ray, the multiplexed model id the ingress routes by. A skill's key is its content id (past the
    engine's rank limit it is served cut to that rank, and the key says so); a composition's, its content key."""

    key: str
    skills: tuple[SkillInfo, ...]
    composition: Composition | None = None  # None: skills[0] alone


@dataclass
class Served:
    adapter: EngineAdapter
    skills: list[str]  # resolved references, name@version
    weights: list[float]
    method: str | None
    cache: str | None  # "hit" | "miss" for compositions
    rank: int
    refactored: bool = False
    relative_error: float = 0.0

    def describe(self) -> dict:
        return {
            "skills": self.skills, "weights": self.weights, "method": self.method, "cache": self.cache,
            "rank": self.rank, "refactored": self.refactored, "relative_error": round(self.relative_error, 6),
        }


class AdapterCache:
    def __init__(self, registry: Registry, data_dir: Path, max_rank: int, budget: ComposeBudget | None = None,
                 workers: int = 1, disk_bytes: int | None = 8 << 30, grace: float = 60.0) -> None:
        self.registry = registry
        self.dir = data_dir
        self.max_rank = max_rank
        self.folders = Folders(data_dir, disk_bytes, grace)
        # every composition the server computes (here, stored compositions, learned-weight searches) goes through it
        self.composer = Composer(budget, workers)
        # a key's lock lives while a request holds or waits for it
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._served: LRUCache[str, SkillInfo] = LRUCache(MEMO)  # ref as asked -> what it resolved to last time
        # served content key -> engine id (the registry's; kept for Redis outages), and back
        self._ids: LRUCache[str, int] = LRUCache(MEMO)
        self._keys_by_id: LRUCache[int, str] = LRUCache(MEMO)

    def knows(self, ref: str) -> bool:
        """Whether ``ref`` was served here and its folder is still on disk (servable without Redis)."""
        info = self._served.get(ref)
        return info is not None and (self._skill_folder(info) / "adapter_config.json").exists()

    def skill_target(self, info: SkillInfo) -> Target:
        """One skill served alone."""
        return Target(self._skill_key(info), (info,))

    def composition_target(self, comp: Composition, infos: list[SkillInfo]) -> Target:
        """``comp`` over the skill versions ``infos`` (its skills, resolved, in order)."""
        return Target(comp.content_key([i.content_id for i in infos], self.max_rank), tuple(infos), comp)

    async def serve(self, target: Target) -> Served:
        """The engine-ready adapter of ``target``, from the versions it names (nothing is resolved again)."""
        if target.composition is None:
            return await self._serve_skill(target.skills[0])
        return await self._serve_composition(target)

    async def skill(self, ref: str) -> Served:
        """``ref`` served alone (resolved now)."""
        return await self.serve(self.skill_target(await self._info(ref)))

    async def composition(self, comp: Composition) -> Served:
        """``comp`` served (its skills resolved now)."""
        return await self.serve(self.composition_target(comp, [await self._info(ref) for ref in comp.skills]))

    async def resolve(self, ref: str) -> SkillInfo:
        """The skill version ``ref`` names (NotFoundError if none); answered from memory during a Redis outage."""
        return await self._info(ref)

    async def _info(self, ref: str) -> SkillInfo:
        """The registry's answer; while Redis is unavailable, the last answer for a ref served before
        (already-loaded adapters keep serving through a Redis outage; new ones get the 503)."""
        try:
            info = await asyncio.to_thread(self.registry.info, ref)
        except UnavailableError:
            if ref in self._served:
                return self._served[ref]
            raise
        self._served[ref] = info
        return info

    async def engine_id(self, key: str) -> int:
        """The registry's id for ``key``, never one this process's engine already uses for other content."""
        if key not in self._ids:
            id_ = await asyncio.to_thread(self.registry.engine_ids.get, key)
            if self._keys_by_id.get(id_, key) != key:  # Redis lost its ids since this engine got them
                id_ = await asyncio.to_thread(self.registry.engine_ids.get, key, max(self._keys_by_id))
            self._ids[key], self._keys_by_id[id_] = id_, key
        id_ = self._ids[key]
        self._keys_by_id[id_] = key  # both maps keep what was used last (the ids the engine may still hold)
        return id_

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def forget(self, deleted: list[SkillInfo]) -> list[Path]:
        """After a delete: drop what only the deleted versions used (their folders, the folders of
        compositions made from them, what they resolved to); returns the folders removed."""
        refs = {i.ref for i in deleted}
        for asked in [a for a, info in self._served.items() if info.ref in refs]:
            self._served.pop(asked, None)
        try:
            unused = await asyncio.to_thread(self.registry.unused, {i.content_id for i in deleted})
        except UnavailableError:  # deleted already; the folders are only a cache: the disk budget removes them in time
            return []
        return await asyncio.to_thread(self.folders.forget, unused)

    async def _store(self, folder: Path, adapter: LoraAdapter, inputs: list[str], meta: dict | None = None,
                     param: str | None = None) -> Hold:
        """Write the folder within the disk budget (its bytes admitted first: refused, it is not written); held."""
        files = await asyncio.to_thread(_files, adapter, meta)

        def admit_and_write() -> Hold:  # one thread: a request that goes away does not stop it half-way
            hold = self.folders.admit(folder, sum(map(len, files.values())), inputs, param)
            try:
                self._write(folder, files)
            except BaseException:
                hold.release()  # its entry goes with it (nothing on disk)
                raise
            return hold

        return await asyncio.to_thread(admit_and_write)

    @staticmethod
    def _write(folder: Path, files: dict[str, bytes]) -> None:
        """Write the folder under a temporary name and rename it: readers never see half of it."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            tmp.chmod(0o755)
            tmp.rename(folder)
        except OSError:
            if not folder.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _skill_key(self, info: SkillInfo) -> str:
        """By content id; a skill above the engine's rank limit is cut to it, so its key also names the limit."""
        return info.content_id if info.rank <= self.max_rank else f"{info.content_id}-r{self.max_rank}"

    def _skill_folder(self, info: SkillInfo) -> Path:
        return self.dir / "adapters" / self._skill_key(info)

    async def _serve_skill(self, info: SkillInfo) -> Served:
        ref = info.ref
        folder = self._skill_folder(info)
        refactored, rel, rank = False, 0.0, info.rank
        async with self._lock(folder.name):
            hold = await asyncio.to_thread(self.folders.claim, folder)
            if hold is None:
                loaded, adapter = await asyncio.to_thread(self.registry.load, info.ref)
                if loaded.content_id != info.content_id:  # re-encoded in between: name the folder by what was read
                    info = self._served[ref] = loaded
                    folder = self._skill_folder(info)
                if not adapter.is_engine_native() or adapter.rank > self.max_rank:
                    # rank/alpha patterns or a rank above the engine's limit: hand the engine
                    # the equivalent uniform-rank adapter (exact unless the rank must shrink)
                    adapter, report = await self.composer.compose(
                        Composition(skills=(info.ref,), method="linear"), [info], [adapter], max_rank=self.max_rank)
                    refactored, rel, rank = report.refactored, report.relative_error, report.rank
                hold = await self._store(folder, adapter, [info.content_id], param="model")
        engine_adapter = HeldAdapter(info.ref, await self.engine_id(folder.name), str(folder), hold)
        return Served(engine_adapter, [info.ref], [1.0], None, None, rank, refactored, rel)

    async def _serve_composition(self, target: Target) -> Served:
        comp, infos, key = target.composition, list(target.skills), target.key
        inputs = sorted({i.content_id for i in infos})
        folder = self.dir / "compositions" / key
        async with self._lock(key):
            meta: dict
            hold = await asyncio.to_thread(self.folders.claim, folder)
            if hold is not None and (folder / "mosaic.json").exists():
                cache, meta = "hit", _read_meta(folder)
            else:
                stored = await asyncio.to_thread(self.registry.compositions.get, key)
                if stored is not None:
                    cache, (meta, adapter) = "hit", stored
                else:
                    cache = "miss"
                    self.composer.check(comp, infos)  # before the inputs are read
                    adapters = [(await asyncio.to_thread(self.registry.load, i.ref))[1] for i in infos]
                    t0 = time.perf_counter()
                    # (the request abandoned: so is the work)
                    adapter, report = await self.composer.compose(comp, infos, adapters, max_rank=self.max_rank)
                    metrics.COMPOSE_SECONDS.observe(time.perf_counter() - t0)
                    meta = {
                        "key": key, "skills": [i.ref for i in infos], "rank": report.rank,
                        "exact_rank": report.exact_rank, "refactored": report.refactored,
                        "relative_error": report.relative_error, "weights": list(report.weights),
                        "inputs": inputs,
                    }
                    await asyncio.to_thread(self.registry.compositions.put, key, adapter, meta, inputs)
                meta = {**meta, "inputs": inputs}  # (results cached before inputs were recorded lack them)
                hold = await self._store(folder, adapter, inputs, meta, param="composition")
        engine_adapter = HeldAdapter(f"composition-{key}", await self.engine_id(key), str(folder), hold)
        return Served(
            engine_adapter, [i.ref for i in infos], meta.get("weights", list(comp.resolved_weights)), comp.method, cache,
            int(meta["rank"]), bool(meta["refactored"]), float(meta["relative_error"]),
        )


def _files(adapter: LoraAdapter, meta: dict | None) -> dict[str, bytes]:
    """The folder's files, as bytes (their sizes are what it takes on disk)."""
    files = {CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: adapter.weights_bytes()}
    if meta is not None:
        files["mosaic.json"] = json.dumps(meta).encode()
    return files


def _read_meta(folder: Path) -> dict:
    return json.loads((folder / "mosaic.json").read_text())
