"""The GPU probe is slow (it imports torch in the kohya venv), so its answer is kept for a while."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from daemon.pipeline.env_check import GpuInfo

CACHE_SECONDS = 300.0


class GpuCache:
    def __init__(self, probe: Callable[[], GpuInfo]) -> None:
        self._probe = probe
        self._info: GpuInfo | None = None
        self._lock = asyncio.Lock()

    async def get(self, *, refresh: bool = False) -> GpuInfo:
        async with self._lock:
            stale = self._info is None or time.time() - self._info.probed_at > CACHE_SECONDS
            if refresh or stale:
                self._info = await asyncio.to_thread(self._probe)
            assert self._info is not None
            return self._info
