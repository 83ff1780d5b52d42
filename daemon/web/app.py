"""The application factory: the only place where the daemon's parts are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial

from aiohttp import WSCloseCode, web

from daemon.config import Config
from daemon.gpu import GpuCache
from daemon.hub import EventHub
from daemon.jobs.queue import JobQueue
from daemon.jobs.store import JobStore
from daemon.pipeline.env_check import GpuInfo, kohya_python, probe_gpu
from daemon.pipeline.runner import JobRunner
from daemon.web.api import routes
from daemon.web.keys import CONFIG, GPU, HUB, QUEUE, SOCKETS, STORE
from daemon.web.middlewares import error_middleware, security_middleware
from daemon.web.ws import websocket_handler

log = logging.getLogger(__name__)


def create_app(config: Config, *, gpu_probe: Callable[[], GpuInfo] | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware(), security_middleware(config)])
    app[CONFIG] = config
    app[GPU] = GpuCache(gpu_probe or partial(probe_gpu, kohya_python(config)))
    app[SOCKETS] = set()
    app.add_routes(routes)
    app.router.add_get("/ws", websocket_handler)
    app.cleanup_ctx.append(_jobs_ctx)
    app.on_shutdown.append(_close_sockets)
    return app


async def _jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.db_path)
    hub = EventHub(store)
    queue = JobQueue(config, store, hub, JobRunner(config, store, hub, app[GPU].get))
    app[STORE], app[HUB], app[QUEUE] = store, hub, queue
    await queue.start()
    try:
        yield
    finally:
        await queue.stop()
        store.close()


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon shutting down"), 2)
