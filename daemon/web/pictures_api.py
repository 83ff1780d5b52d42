"""Checks on the pictures before a job (warnings, never blocking) and the face crop preview."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from aiohttp import web

from daemon.errors import BadInput
from daemon.pipeline.dataset import prep_workers
from daemon.pipeline.faces import find_faces
from daemon.pipeline.params import INT_RANGES
from daemon.web.keys import CONFIG
from daemon.web.uploads import UPLOAD_SLOTS, check_body_headers, read_train_form, upload_limits

routes = web.RouteTableDef()


# --------------------------------------------------------------------------- POST /pictures/check (C1)
_check_log = logging.getLogger(__name__ + ".check")
CHECK_RESOLUTION = 512


def query_resolution(raw: str | None, *, default: int, low: int, high: int) -> int:
    """`?resolution=` as plain ASCII digits, or `default` when absent. Not int(raw): it takes ' 512', '+512',
    '5_12' and '٥١٢', and raises ValueError past 4,300 digits; not str.isdigit() alone: it is true for '²', which
    int() refuses."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not low <= int(raw) <= high:
        raise BadInput(f"'resolution' must be a whole number of pixels from {low} to {high}.", key="resolution")
    return int(raw)


def check_resolution(raw: str | None) -> int:
    """`?resolution=`: the training resolution the pictures are judged for (the same range as the param); empty
    is the default."""
    low, high = INT_RANGES["resolution"]
    return query_resolution(raw or None, default=CHECK_RESOLUTION, low=low, high=high)


@routes.post("/pictures/check")
async def check_pictures(request: web.Request) -> web.Response:
    """Warnings about the pictures (never blocking): the work runs in threads, the event loop stays free."""
    config = request.app[CONFIG].current
    resolution = check_resolution(request.query.get("resolution"))
    check_body_headers(request)
    with request.app[UPLOAD_SLOTS].take(config.max_uploads):
        form = await read_train_form(request, tmp_root=config.data_dir / "tmp", limits=upload_limits(config),
                                     text_fields=frozenset())
        work: asyncio.Future[dict[str, object]] | None = None
        try:
            if not form.uploads:
                raise BadInput("Send at least one picture in 'images'.", key="images")
            items = [(u.path, u.client_name) for u in form.uploads]
            work = asyncio.ensure_future(asyncio.to_thread(_run_checks, items, resolution))
            report = await asyncio.shield(work)  # a client that leaves does not stop the threads mid-file
        finally:
            _remove_when_done(form.tmp_dir, work)
    return web.json_response(report)


def _run_checks(items: list[tuple[Path, str]], resolution: int) -> dict[str, object]:
    # Imported on first use, in this worker thread: numpy, scipy and imagehash cost the daemon ~27 MB for its
    # lifetime (tests/test_publish.py keeps numpy out of a daemon that never checks pictures).
    from daemon.pipeline import picture_checks

    return picture_checks.check_pictures(items, resolution, workers=prep_workers(len(items))).to_json()


def _remove_when_done(tmp_dir: Path, work: asyncio.Future[dict[str, object]] | None) -> None:
    """The uploads go on every path; while threads still read them (the client left), once they are done."""
    if work is None or work.done():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    _check_log.info("the client left during POST /pictures/check; its pictures are removed when the check ends")
    work.add_done_callback(lambda _: shutil.rmtree(tmp_dir, ignore_errors=True))


# ------------------------------------------------------------------------------- POST /pictures/faces (C2)
FACES_DEFAULT_RESOLUTION = 512
FACES_RESOLUTIONS = (256, 2048)


def _faces_resolution(raw: str | None) -> int:
    """`?resolution=`: the crop is at least this wide where the picture allows (the training resolution)."""
    low, high = FACES_RESOLUTIONS
    return query_resolution(raw, default=FACES_DEFAULT_RESOLUTION, low=low, high=high)


@routes.post("/pictures/faces")
async def pictures_faces(request: web.Request) -> web.Response:
    """The largest face of each picture and the crop prep would use, for the tab's preview. A picture that
    cannot be read has width 0 and no face; a detector that cannot run answers available: false and why."""
    config = request.app[CONFIG].current
    resolution = _faces_resolution(request.query.get("resolution"))
    with request.app[UPLOAD_SLOTS].take(config.max_uploads):
        form = await read_train_form(request, tmp_root=config.data_dir / "tmp", limits=upload_limits(config),
                                     text_fields=frozenset())
        try:
            if not form.uploads:
                raise BadInput("No pictures were sent; send them in the field 'images'.", key="images")
            result = await find_faces(config, [u.path for u in form.uploads], form.tmp_dir / "faces",
                                      min_side=resolution)
        finally:
            await asyncio.to_thread(shutil.rmtree, form.tmp_dir, True)
    return web.json_response({
        "available": result.available,
        "problem": result.problem,
        "pictures": [p.to_json(i) for i, p in enumerate(result.pictures)],
    })
