"""Small asyncio pieces the daemon needs in more than one place."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`aw`'s result, or asyncio.TimeoutError once `timeout` seconds have passed (`aw` is then cancelled).

    Not asyncio.wait_for: before Python 3.12 it swallows a cancel that arrives just as `aw` completes, so a
    loop around it goes on after being cancelled (a WebSocket sender waits for the next frame for ever, and
    unsubscribe and shutdown hang with it).
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
