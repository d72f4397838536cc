"""The server's background jobs on the registry's job store in Redis (adapter_store/jobs.py): every replica
lists, shows and cancels every job; a job runs in the process that started it.

A job's owner writes its record when the job starts, at every heartbeat while it runs (its progress, the time
it was last seen) and when it ends. A running job not seen for ``DEAD_AFTER`` seconds is reported failed: its
server stopped (its slot has expired by then too, so another job may start). A cancel, from any replica, sets a
flag in Redis that the owner's heartbeat turns into the job's stop event (at once when the owner is asked).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from adapter_store.registry import Registry
from lora.errors import ConflictError, MosaicError

log = logging.getLogger("mosaic.jobs")

BEAT = 1.0  # seconds between heartbeats: progress is this fresh, a cancel from another replica this quick
DEAD_AFTER = 30.0  # a running job not seen for this long is reported failed
SLOT_SECONDS = 30.0  # a slot's expiry, pushed forward at every heartbeat

Job = TypeVar("Job", bound=BaseModel)


@dataclass
class _Running:
    job: BaseModel
    kind: str
    namespace: str | None
    slot: str | None
    stop: threading.Event


class Board:
    """The jobs of one server: those it runs (in memory, published) and every replica's (read from Redis)."""

    def __init__(self, registry: Registry, beat: float = BEAT) -> None:
        self.registry = registry
        self.beat = beat
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the owner's side ---------------------------------------------------------------------------
    def start(self, job: BaseModel, kind: str, *, namespace: str | None = None, slot: str | None = None,
              busy: str = "a job is already running", most: int | None = None, full: str = "") -> threading.Event:
        """Publish a new job and return its stop event. ``slot``: a name one running job holds at a time across
        every replica (ConflictError ``busy`` when another holds it); ``most``: how many jobs of ``kind`` this
        server runs at once (ConflictError ``full``)."""
        if slot is not None:
            holder = self.registry.jobs.claim(slot, job.id, SLOT_SECONDS)
            if holder is not None:
                raise ConflictError(f"{busy} (job {holder})")
        running = _Running(job, kind, namespace, slot, threading.Event())
        try:
            with self._lock:
                if most is not None and (n := sum(r.kind == kind for r in self._running.values())) >= most:
                    raise ConflictError(full.format(n=n))
                self._running[job.id] = running
            self._publish(running)
        except BaseException:
            with self._lock:
                self._running.pop(job.id, None)
            if slot is not None:
                self.registry.jobs.release(slot, job.id)
            raise
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._heartbeat, name="mosaic-jobs", daemon=True)
                self._thread.start()
        return running.stop

    def running(self, kind: str) -> int:
        """How many jobs of ``kind`` this server runs now."""
        with self._lock:
            return sum(r.kind == kind for r in self._running.values())

    def finish(self, job: BaseModel) -> None:
        """The job ended (its state says how): its last record, its slot let go of."""
        with self._lock:
            running = self._running.pop(job.id, None)
        if running is None:
            return
        try:
            self._publish(running, finished=True)
        except MosaicError as exc:  # Redis away: the record ages into "its server stopped"
            log.warning("job %s ended as %s but could not be recorded: %s", job.id, job.state, exc.message)
        finally:
            if running.slot is not None:
                try:
                    self.registry.jobs.release(running.slot, job.id)
                except MosaicError:
                    pass  # it expires

    def close(self) -> None:
        self._closed.set()

    def _publish(self, running: _Running, finished: bool = False) -> None:
        job = running.job.model_dump(mode="json")
        record = {"kind": running.kind, "namespace": running.namespace, "seen": time.time(), "job": job}
        # a heartbeat that raced the job's end writes an ended job too: it expires as the last record would
        self.registry.jobs.put(running.job.id, _dumps(record), running.job.started, finished or job["state"] != "running")

    def _heartbeat(self) -> None:
        while not self._closed.wait(self.beat):
            with self._lock:
                running = list(self._running.values())
            if not running:
                continue
            try:
                for r in running:
                    if r.job.id in self._running:  # not finished meanwhile (finish wrote the last record)
                        self._publish(r)
                    if r.slot is not None:
                        self.registry.jobs.refresh(r.slot, r.job.id, SLOT_SECONDS)
                for job_id in self.registry.jobs.cancelled([r.job.id for r in running]):
                    next(r for r in running if r.job.id == job_id).stop.set()
            except MosaicError as exc:  # Redis away for a while: the jobs go on, their records catch up
                log.warning("job heartbeat: %s", exc.message)
            except Exception:
                log.exception("job heartbeat failed")

    # ---- every replica's side -----------------------------------------------------------------------
    def get(self, job_id: str, model: type[Job], kind: str) -> tuple[Job, str | None] | None:
        """Job ``job_id`` of ``kind`` and its namespace: as it is now if it runs here, else as its owner last
        wrote it; None if there is none."""
        with self._lock:
            here = self._running.get(job_id)
        if here is not None and here.kind == kind:
            return model.model_validate(here.job.model_dump()), here.namespace
        raw = self.registry.jobs.get(job_id)
        record = None if raw is None else _loads(raw)
        if record is None or record["kind"] != kind:
            return None
        return _read(record, model), record["namespace"]

    def list(self, model: type[Job], kind: str) -> list[tuple[Job, str | None]]:
        """Every listed job of ``kind``, oldest first, with its namespace."""
        records = [_loads(raw) for raw in self.registry.jobs.newest()]
        with self._lock:
            here = {i: r for i, r in self._running.items() if r.kind == kind}
        return [(model.model_validate(here[job.id].job.model_dump()), ns) if job.id in here else (job, ns)
                for job, ns in ((_read(r, model), r["namespace"]) for r in records if r is not None
                                and r["kind"] == kind)]

    def cancel(self, job_id: str) -> None:
        """Ask job ``job_id`` to stop: at once if it runs here, within a heartbeat if it runs elsewhere."""
        with self._lock:
            running = self._running.get(job_id)
        if running is not None:
            running.stop.set()
        self.registry.jobs.cancel(job_id)


def _read(record: dict, model: type[Job]) -> Job:
    """The job as recorded; one still marked running whose owner has not been seen for DEAD_AFTER: failed."""
    job = model.model_validate(record["job"])
    silent = time.time() - record["seen"]
    if getattr(job, "state", None) == "running" and silent > DEAD_AFTER:
        job = job.model_copy(update={"state": "failed", "error": f"the server running this job stopped (not seen for "
                                                               f"{silent:.0f} s)"})
    return job


def _dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def _loads(raw: str) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and {"kind", "namespace", "seen", "job"} <= record.keys() else None


def board(app_state) -> Board:
    """The server's board (one per app, made on first use)."""
    if not hasattr(app_state, "job_board"):
        app_state.job_board = Board(app_state.mosaic.registry)
    return app_state.job_board
