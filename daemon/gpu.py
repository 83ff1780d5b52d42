"""The GPU probe is slow (it imports torch in the kohya venv: 2-4 s), so it never runs on a request's path.

It runs once in the background at start-up; its answer is kept, and once it is older than CACHE_SECONDS the
next caller still gets it at once while a fresh probe runs in the background. Only a caller that arrives before
the very first probe has finished waits, for that same probe. At most one probe runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from daemon.pipeline.env_check import GpuInfo

CACHE_SECONDS = 300.0

log = logging.getLogger(__name__)


class GpuCache:
    def __init__(self, probe: Callable[[], GpuInfo], *, max_age: float | None = None) -> None:
        self._probe = probe
        self._max_age = CACHE_SECONDS if max_age is None else max_age
        self._info: GpuInfo | None = None
        self._running: asyncio.Task[GpuInfo] | None = None

    def start(self) -> None:
        """Begin the first probe in the background (call from the running event loop, at start-up)."""
        self._refresh()

    async def get(self, *, refresh: bool = False) -> GpuInfo:
        """The last probe's answer; `refresh` waits for a new probe (for an explicit 'test my setup')."""
        if refresh:
            # A probe already under way started after the caller asked: its answer is fresh enough.
            return await asyncio.shield(self._refresh())
        if self._info is None:
            return await asyncio.shield(self._refresh())
        if time.time() - self._info.probed_at > self._max_age:
            self._refresh()
        return self._info

    async def close(self) -> None:
        """Stop waiting for a probe in flight (its thread finishes on its own: the probe has a timeout)."""
        task, self._running = self._running, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _refresh(self) -> asyncio.Task[GpuInfo]:
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._run())
        return self._running

    async def _run(self) -> GpuInfo:
        try:
            info = await asyncio.to_thread(self._probe)
        except Exception as exc:  # probe_gpu reports its own failures; anything else must not wedge the cache
            log.exception("the GPU probe failed")
            info = GpuInfo(cuda=False, error=f"the GPU probe failed: {exc}", probed_at=time.time(), ran=False)
        self._info = info
        return info
