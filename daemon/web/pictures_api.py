"""Checks on the pictures before a job (warnings, never blocking) and the face crop preview."""

from __future__ import annotations

import asyncio
import shutil

from aiohttp import web

from daemon.errors import BadInput
from daemon.pipeline.faces import find_faces
from daemon.web.api import upload_limits
from daemon.web.keys import CONFIG
from daemon.web.uploads import UPLOAD_SLOTS, read_train_form

routes = web.RouteTableDef()


# ------------------------------------------------------------------------------- POST /pictures/faces (C2)
FACES_DEFAULT_RESOLUTION = 512
FACES_RESOLUTIONS = (256, 2048)


def _faces_resolution(raw: str | None) -> int:
    """`?resolution=`: the crop is at least this wide where the picture allows (the training resolution)."""
    if raw is None:
        return FACES_DEFAULT_RESOLUTION
    low, high = FACES_RESOLUTIONS
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadInput(f"'resolution' must be a whole number from {low} to {high}.", key="resolution")
    return int(raw)


def _faces_text(name: str, value: str) -> None:
    raise BadInput(f"POST /pictures/faces takes only pictures (the field 'images'), not '{name}'.", key=name)


@routes.post("/pictures/faces")
async def pictures_faces(request: web.Request) -> web.Response:
    """The largest face of each picture and the crop prep would use, for the tab's preview. A picture that
    cannot be read has width 0 and no face; a detector that cannot run answers available: false and why."""
    config = request.app[CONFIG].current
    resolution = _faces_resolution(request.query.get("resolution"))
    with request.app[UPLOAD_SLOTS].take(config.max_uploads):
        form = await read_train_form(request, tmp_root=config.data_dir / "tmp", limits=upload_limits(config),
                                     check_text=_faces_text)
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
