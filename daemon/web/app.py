"""The application factory: the only place where the daemon's parts are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger

from daemon.config import Config, LiveConfig
from daemon.config_watch import ConfigReport, ConfigWatcher
from daemon.events import EventType
from daemon.gpu import GpuCache
from daemon.hub import EventHub
from daemon.instance_lock import InstanceLock
from daemon.jobs.queue import JobQueue
from daemon.jobs.recovery import sweep_temp_files
from daemon.jobs.store import JobStore
from daemon.pipeline.env_check import GpuInfo, kohya_python, probe_gpu
from daemon.pipeline.runner import JobRunner
from daemon.pipeline.standby import Standby
from daemon.web import checkpoints_api, pictures_api, tagger_api
from daemon.web.api import SHUTDOWN, Shutdown, routes
from daemon.web.keys import CONFIG, GPU, HUB, QUEUE, STORE
from daemon.web.middlewares import error_middleware, protocol_logger, security_middleware, shown_path
from daemon.web.uploads import UPLOAD_SLOTS, UploadSlots
from daemon.web.ws import websocket_handler

log = logging.getLogger(__name__)

STANDBY = web.AppKey("standby", Standby)
# What the tab asks when it opens and while the form is filled in: the sign that a job may come (standby.py).
INTEREST_PATHS = frozenset({"/models", "/fit"})


def create_app(config: Config, *, gpu_probe: Callable[[], GpuInfo] | None = None) -> web.Application:
    live = LiveConfig(config)
    # Bodies are read as sent: a compressed body is refused with a sentence (uploads.py) instead of failing
    # inside aiohttp's decompressor, where no handler can answer.
    app = web.Application(middlewares=[error_middleware(), security_middleware(live)],
                          handler_args={"auto_decompress": False, "logger": protocol_logger()})
    app[CONFIG] = live
    app[UPLOAD_SLOTS] = UploadSlots()
    # The kohya python can change live: each probe asks the settings in force.
    app[GPU] = GpuCache(gpu_probe or (lambda: probe_gpu(kohya_python(live.current))))
    app[SHUTDOWN] = Shutdown()
    app.add_routes(routes)
    app.add_routes(checkpoints_api.routes)
    app.add_routes(tagger_api.routes)
    app.add_routes(pictures_api.routes)
    app.router.add_get("/ws", websocket_handler)
    app.cleanup_ctx.append(_jobs_ctx)
    app.cleanup_ctx.append(tagger_api.tagger_ctx)  # after the jobs: it needs the hub, and stops before it
    app.cleanup_ctx.append(_config_watch_ctx)
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(_note_interest)
    return app


async def _note_interest(request: web.Request, response: web.StreamResponse) -> None:
    if request.method == "GET" and request.path in INTEREST_PATHS and response.status < 300 \
            and (standby := request.app.get(STANDBY)) is not None:
        standby.interest()


async def _jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].current
    lock = InstanceLock(config.data_dir)
    lock.acquire()  # before recovery: never treat another daemon's running job as left over
    try:
        async with _jobs(app, config):
            yield
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def _jobs(app: web.Application, config: Config) -> AsyncIterator[None]:
    # What a crash left half-written (uploads, LoRA copies); no request or copy can be in flight before we serve.
    await asyncio.to_thread(sweep_temp_files, config)
    store = JobStore(config.db_path)
    hub = EventHub(store)
    standby = Standby(app[CONFIG], app[GPU].get, lambda: queue.current is not None,
                      watching=lambda: hub.subscriber_count > 0)
    queue = JobQueue(app[CONFIG], store, hub,
                     lambda current: JobRunner(current, store, hub, app[GPU].get, standby=standby))
    app[STORE], app[HUB], app[QUEUE], app[STANDBY] = store, hub, queue, standby
    app[GPU].start()  # in the background: the first request finds the answer ready
    await queue.start()
    await standby.start()
    try:
        yield
    finally:
        await standby.stop()
        await queue.stop()
        await app[GPU].close()
        store.close()


async def _config_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the config file (when the daemon has one) and announce each reload on the WebSocket."""
    path = app[CONFIG].current.path
    if path is None or not path.parent.is_dir():
        yield
        return

    async def announce(report: ConfigReport) -> None:
        if {"kohya.python", "kohya.accelerate_bin"} & set(report.changed):
            app[GPU].start()  # probe again with the new kohya python; /config/test always probes afresh
        await app[HUB].emit(EventType.CONFIG, None, report.to_json())

    watcher = ConfigWatcher(app[CONFIG], path, announce)
    await watcher.start()
    try:
        yield
    finally:
        await watcher.stop()


async def _close_sockets(app: web.Application) -> None:
    async def close(ws: web.WebSocketResponse) -> None:
        await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon shutting down"), 2)

    await app[HUB].close_all(close)


class AccessLogger(AbstractAccessLogger):
    """Method, path, status, time: never the query string, where the WebSocket carries the token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.3fs", request.method, shown_path(request), response.status, time)
