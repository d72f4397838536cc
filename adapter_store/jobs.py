"""Background jobs' records in Redis, beside the library, so that every replica sees every job.

The store keeps opaque JSON records (the server's job model is the server's): one per job, an index by start
time, a cancel flag any replica may set, and slots (a name held by one job at a time, with an expiry its
owner keeps pushing forward, so a slot whose owner died frees itself).
"""

from __future__ import annotations

import redis

from adapter_store.layout import KeyLayout

KEEP = 500  # jobs listed (the newest); older records expire on their own (FINISHED_TTL)
FINISHED_TTL = 7 * 24 * 3600  # a finished job's record is kept this many seconds
CANCEL_TTL = 24 * 3600

# release a slot only if this job still holds it (compare and delete, in one step)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# push a slot's expiry forward only if this job still holds it
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class JobStore:
    """``P:job:ID`` (the record), ``P:jobs`` (ZSET id → start time), ``P:job:ID:cancel``, ``P:jobslot:NAME``."""

    def __init__(self, client: redis.Redis, keys: KeyLayout) -> None:
        self.r, self.keys = client, keys
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)

    def _job(self, job_id: str) -> str:
        return self.keys.k("job", job_id)

    def put(self, job_id: str, record: str, started: float, finished: bool = False) -> None:
        """Write a job's record; a finished one expires after FINISHED_TTL, and the index keeps the newest KEEP."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._job(job_id), record, ex=FINISHED_TTL if finished else None)
            pipe.zadd(self.keys.k("jobs"), {job_id: started})
            pipe.zremrangebyrank(self.keys.k("jobs"), 0, -KEEP - 1)
            pipe.execute()

    def get(self, job_id: str) -> str | None:
        value = self.r.get(self._job(job_id))
        return None if value is None else value.decode()

    def newest(self, count: int = KEEP) -> list[str]:
        """The records of the newest ``count`` jobs, oldest first (those expired or gone are left out)."""
        ids = [i.decode() for i in self.r.zrange(self.keys.k("jobs"), -count, -1)]
        if not ids:
            return []
        return [v.decode() for v in self.r.mget([self._job(i) for i in ids]) if v is not None]

    def cancel(self, job_id: str) -> None:
        """Ask for the job to stop (its owner reads the flag: :meth:`cancelled`)."""
        self.r.set(self.keys.k("job", job_id, "cancel"), "1", ex=CANCEL_TTL)

    def cancelled(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` someone asked to cancel."""
        if not job_ids:
            return set()
        flags = self.r.mget([self.keys.k("job", i, "cancel") for i in job_ids])
        return {i for i, f in zip(job_ids, flags) if f is not None}

    def claim(self, slot: str, job_id: str, seconds: float) -> str | None:
        """Take ``slot`` for ``job_id`` for ``seconds`` (None), or the id of the job that holds it."""
        key = self.keys.k("jobslot", slot)
        if self.r.set(key, job_id, nx=True, px=int(seconds * 1000)):
            return None
        holder = self.r.get(key)
        return holder.decode() if holder is not None else self.claim(slot, job_id, seconds)

    def refresh(self, slot: str, job_id: str, seconds: float) -> bool:
        """Push the slot's expiry forward; False if the job no longer holds it."""
        return bool(self._refresh(keys=[self.keys.k("jobslot", slot)], args=[job_id, int(seconds * 1000)]))

    def release(self, slot: str, job_id: str) -> None:
        self._release(keys=[self.keys.k("jobslot", slot)], args=[job_id])


__all__ = ["JobStore"]
