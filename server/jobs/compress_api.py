"""Library compression (MoS shard pools) as a background job of the server.

``POST /v1/admin/compress`` starts one (202; 409 while one runs, here or in another replica — the
Redis lock decides), ``GET /v1/admin/compress`` tells how it goes. The job runs in a worker thread:
requests keep being served, and each skill moves to its new form in its own transaction.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from adapter_store.compression import CompressOptions, compress_library, decompress_library
from lora.errors import ConflictError, MosaicError
from server.edge import auth
from server.edge.auth import require_scope

router = APIRouter(tags=["skills"])
admin = [Depends(require_scope("admin"))]


class CompressRequest(CompressOptions):
    off: bool = False  # store every skill exact again and stop encoding uploads


class CompressJob(BaseModel):
    state: Literal["idle", "running", "done", "failed"] = "idle"
    request: CompressRequest | None = None
    started: float | None = None
    finished: float | None = None
    progress: dict = {}
    report: dict | None = None
    error: str | None = None


def _job(request: Request) -> CompressJob:
    state = request.app.state
    if not hasattr(state, "compress_job"):
        state.compress_job = CompressJob()
    return state.compress_job


@router.post("/v1/admin/compress", status_code=202, response_model=CompressJob, dependencies=admin)
async def start_compress(body: CompressRequest, request: Request) -> CompressJob:
    auth.whole_library(request, "compression")
    registry = request.app.state.mosaic.registry
    previous = _job(request)
    if previous.state == "running":
        raise ConflictError("a compression is already running")
    # claimed before the first await, so two requests to this server cannot both start one
    job = request.app.state.compress_job = CompressJob(state="running", request=body, started=time.time())
    if await asyncio.to_thread(registry.shards.running):  # another replica's (or the CLI's) run
        request.app.state.compress_job = previous
        raise ConflictError("a compression is already running")

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
        except Exception as exc:  # reported to whoever polls; the registry is consistent (see compression.py)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()

    tasks = request.app.state.mosaic.tasks
    tasks.append(asyncio.get_running_loop().create_task(asyncio.to_thread(run)))
    return job


@router.get("/v1/admin/compress", response_model=CompressJob, dependencies=admin)
async def compress_status(request: Request) -> CompressJob:
    auth.whole_library(request, "compression")
    return _job(request)
