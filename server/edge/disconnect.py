"""Work a request asked for, abandoned when its client disconnects before it is done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import Request


class ClientGone(Exception):
    """The client disconnected before the work it asked for was done."""


async def unless_disconnected(request: Request, work: Awaitable):
    """``work``'s result, or ClientGone (with ``work`` cancelled) if the client disconnects first. The body
    has been read by then, so the next message the server receives is the disconnect (as vLLM's routes do)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled: so is its work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone
