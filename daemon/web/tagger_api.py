"""Automatic tags for the pictures before a job: kohya's WD14 tagger run as a supervised subprocess."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import AsyncIterator

from aiohttp import web

from daemon.errors import BadInput
from daemon.events import EventType
from daemon.pipeline import dataset
from daemon.pipeline.tagger import DEFAULT_THRESHOLD, MAX_THRESHOLD, MIN_THRESHOLD
from daemon.pipeline.tagger_run import TaggerRuns
from daemon.web.keys import CONFIG, HUB, QUEUE
from daemon.web.uploads import UPLOAD_SLOTS, check_body_headers, read_train_form, upload_limits

routes = web.RouteTableDef()
TAGGER = web.AppKey("tagger_runs", TaggerRuns)
TEXT_FIELDS = frozenset({"threshold"})


async def tagger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The run registry; at shutdown every running tagger's process tree is killed (before the hub closes)."""
    hub = app[HUB]
    runs = TaggerRuns(app[CONFIG], lambda data: hub.emit(EventType.TAGGING, None, data),
                      training=lambda: app[QUEUE].current is not None)
    app[TAGGER] = runs
    try:
        yield
    finally:
        await runs.close()


@routes.get("/tagger")
async def tagger_readiness(request: web.Request) -> web.Response:
    ready = await request.app[TAGGER].readiness()
    return web.json_response(ready.to_json())


def parse_threshold(raw: str | None) -> float:
    if raw is None or raw.strip() == "":
        return DEFAULT_THRESHOLD
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not MIN_THRESHOLD <= value <= MAX_THRESHOLD:  # NaN fails this too
        raise BadInput(f"'threshold' must be a number from {MIN_THRESHOLD:g} to {MAX_THRESHOLD:g}.", key="threshold")
    return value


def _check_text(name: str, value: str) -> None:
    if name == "threshold":
        parse_threshold(value)


@routes.post("/tagger/runs")
async def start_run(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    runs = request.app[TAGGER]
    check_body_headers(request)
    with request.app[UPLOAD_SLOTS].take(config.max_uploads):
        form = await read_train_form(request, tmp_root=config.data_dir / "tmp", limits=upload_limits(config),
                                     check_text=_check_text, text_fields=TEXT_FIELDS)
        try:
            threshold = parse_threshold(form.fields.get("threshold"))
            if not form.uploads:
                raise BadInput("No pictures were sent; add them as 'images'.", key="images")
            await asyncio.to_thread(dataset.check_images, form.uploads)
        except BaseException:
            shutil.rmtree(form.tmp_dir, ignore_errors=True)
            raise
    run = await runs.start(form.uploads, form.tmp_dir, threshold)
    return web.json_response({"task_id": run.task_id}, status=202)


@routes.get("/tagger/runs/{task_id}")
async def get_run(request: web.Request) -> web.Response:
    run = request.app[TAGGER].get(request.match_info["task_id"])
    return web.json_response(run.to_json())


@routes.delete("/tagger/runs/{task_id}")
async def delete_run(request: web.Request) -> web.Response:
    run = await request.app[TAGGER].forget(request.match_info["task_id"])
    return web.json_response({"deleted": run.task_id, "state": run.state})
