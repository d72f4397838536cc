"""Library compression (MoS shard pools) as a background job of the server.

``POST /v1/admin/compress`` starts one (202; 409 while one runs, here or in another replica, or from the
CLI — the job board's slot and the compression's Redis lock decide), ``GET /v1/admin/compress`` tells how
the newest one goes, on whichever replica it runs (server/jobs/board.py). The job runs in a worker thread:
requests keep being served, and each skill moves to its new form in its own transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from adapter_store.compression import CompressOptions, compress_library, decompress_library
from lora.errors import ConflictError, MosaicError
from server.edge import auth
from server.edge.auth import require_scope
from server.jobs.board import board

log = logging.getLogger("mosaic.compress")
router = APIRouter(tags=["skills"])
admin = [Depends(require_scope("admin"))]


class CompressRequest(CompressOptions):
    off: bool = False  # store every skill exact again and stop encoding uploads


KIND = "compress"


class CompressJob(BaseModel):
    id: str | None = None
    state: Literal["idle", "running", "done", "failed"] = "idle"
    request: CompressRequest | None = None
    started: float | None = None
    finished: float | None = None
    progress: dict = {}
    report: dict | None = None
    error: str | None = None


@router.post("/v1/admin/compress", status_code=202, response_model=CompressJob, dependencies=admin)
async def start_compress(body: CompressRequest, request: Request) -> CompressJob:
    auth.whole_library(request, "compression")
    registry, jobs = request.app.state.mosaic.registry, board(request.app.state)
    if await asyncio.to_thread(registry.shards.running):  # the CLI's run (or a replica's, past its first step)
        raise ConflictError("a compression is already running")
    job = CompressJob(id=uuid.uuid4().hex[:16], state="running", request=body, started=time.time())
    # the slot is taken in one Redis step: two requests, to this replica or another, cannot both start one
    await asyncio.to_thread(jobs.start, job, KIND, slot=KIND, busy="a compression is already running")

    def progress(what: str, done: int, total: int) -> None:
        job.progress = {"step": what, "done": done, "total": total}

    def run() -> None:
        try:
            if body.off:
                job.report = {"changed": decompress_library(registry, progress)}
            else:
                options = CompressOptions(**body.model_dump(exclude={"off"}))
                report = compress_library(registry, options, progress)
                job.report = {**report.model_dump(), "ratio": report.ratio}
            job.state = "done"
        except MosaicError as exc:
            job.state, job.error = "failed", exc.message
        except Exception as exc:  # reported to whoever polls (and logged); the registry is consistent (compression.py)
            log.exception("compression %s failed", job.id)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()
            jobs.finish(job)

    tasks = request.app.state.mosaic.tasks
    tasks.append(asyncio.get_running_loop().create_task(asyncio.to_thread(run)))
    return job


@router.get("/v1/admin/compress", response_model=CompressJob, dependencies=admin)
async def compress_status(request: Request) -> CompressJob:
    auth.whole_library(request, "compression")
    listed = await asyncio.to_thread(board(request.app.state).list, CompressJob, KIND)
    return listed[-1][0] if listed else CompressJob()
