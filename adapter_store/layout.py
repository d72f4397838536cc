"""The registry's key layout in Redis, named in one place.

``P`` is the key prefix, so tests and deployments can share one Redis:

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
``P:changes``                LIST of the last ``CHANGE_LOG`` changes, oldest first, one per generation (the
                             same JSON as the event): a replica catches up on what changed, not on the library
``P:content:ID``             SET of the versions (name@N) whose served content id is ID (``P:content-index``
                             set once versions stored before this index was kept are listed in it)
``P:c:HASH``, ``P:cache:*``  cached composition results within a byte budget (adapter_store/composition_cache.py)
``P:engine-ids``             HASH served content key -> the engine's integer id (``P:engine-ids:next``
                             the last one handed out): one id per content, the same on every replica
``P:aux:KEY``                HASH of another room's state (e.g. the router's trained model)
``P:job:ID``, ``P:jobs``     a background job's record (JSON) and the index of jobs by start time;
                             ``P:job:ID:cancel`` asks its owner to stop it, ``P:jobslot:NAME`` is held by one
                             running job at a time (adapter_store/jobs.py)
"""

from __future__ import annotations

import json
import uuid

import redis

CHANGE_LOG = 4096  # changes kept in ``P:changes``: a reader further behind than this reads everything again


class KeyLayout:
    """The names of the registry's keys under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def k(self, *parts: object) -> str:
        """``P:part:part…``: any key under the prefix."""
        return ":".join([self.prefix, *map(str, parts)])

    # ---- skills and their versions ---------------------------------------------------
    @property
    def names(self) -> str:
        return self.k("names")

    def skill(self, name: str, field: str) -> str:
        """``P:s:NAME:FIELD``: the skill's ``versions``, ``latest`` or ``next``."""
        return self.k("s", name, field)

    def version(self, name: str, version: int) -> str:
        return self.k("s", name, "v", version)

    def content(self, content_id: str) -> str:
        return self.k("content", content_id)

    @property
    def content_index(self) -> str:
        return self.k("content-index")

    @property
    def gen(self) -> str:
        return self.k("gen")

    @property
    def events(self) -> str:
        return self.k("events")

    @property
    def changes(self) -> str:
        return self.k("changes")

    # ---- MoS shard pools -----------------------------------------------------------
    def pool(self, version: int | str) -> str:
        """``P:mos:pool:V`` (``"*"``: a pattern matching every pool version)."""
        return self.k("mos", "pool", version)

    @staticmethod
    def pool_version_of(key: bytes) -> int:
        """The V of a ``P:mos:pool:V`` key as Redis returns it."""
        return int(key.decode().rsplit(":", 1)[-1])

    @property
    def pools_current(self) -> str:
        return self.k("mos", "current")

    @property
    def pools_next(self) -> str:
        return self.k("mos", "next")

    @property
    def compression_lock(self) -> str:
        return self.k("mos", "lock")

    # ---- other state ------------------------------------------------------------------
    @property
    def engine_ids(self) -> str:
        return self.k("engine-ids")

    @property
    def engine_ids_next(self) -> str:
        return self.k("engine-ids", "next")

    def aux(self, key: str) -> str:
        return self.k("aux", key)


def announce(pipe: redis.client.Pipeline, keys: KeyLayout, event: str, ref: str) -> None:
    """Queue, within a write's transaction, the generation bump, its entry in the change log and the event
    replicas listen for (the log's last entry is always the current generation's; its random id tells a
    reader this is the history it read, not a flushed Redis written up to the same generation again)."""
    change = json.dumps({"event": event, "ref": ref, "id": uuid.uuid4().hex})
    pipe.incr(keys.gen)
    pipe.rpush(keys.changes, change)
    pipe.ltrim(keys.changes, -CHANGE_LOG, -1)
    pipe.publish(keys.events, change)


__all__ = ["CHANGE_LOG", "KeyLayout", "announce"]
