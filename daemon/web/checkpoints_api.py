"""A job's loss history and saved epochs: list them with their previews and loss, publish one into ED's LoRA folder."""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from pathlib import Path

from aiohttp import web

from daemon.errors import Conflict, NotFound, Unavailable
from daemon.jobs.models import Job, PublishedEpoch
from daemon.pipeline import checkpoints, loss_history, publish
from daemon.pipeline.runner import job_paths, output_name
from daemon.web.keys import CONFIG, STORE

routes = web.RouteTableDef()

# One publish at a time per daemon: two clicks on the same epoch must make one copy, not two.
_publish_locks: weakref.WeakKeyDictionary[web.Application, asyncio.Lock] = weakref.WeakKeyDictionary()


async def _job(request: web.Request) -> Job:
    job_id = request.match_info["job_id"]
    job = await asyncio.to_thread(request.app[STORE].get, job_id)
    if job is None:
        raise NotFound(f"There is no job {job_id}.")
    return job


def _epochs(job: Job) -> int:
    return int(job.progress.epochs or job.params.get("epochs") or 0)


@routes.get("/jobs/{job_id}/loss")
async def job_loss(request: web.Request) -> web.Response:
    job = await _job(request)
    points = await asyncio.to_thread(request.app[STORE].loss, job.id)
    return web.json_response({"points": loss_history.to_json(points), "total": job.progress.total,
                              "epochs": _epochs(job)})


async def _scan(request: web.Request, job: Job) -> list[checkpoints.Checkpoint]:
    output = job_paths(request.app[CONFIG].current, job.id).output
    return await asyncio.to_thread(checkpoints.scan, output, output_name(job), _epochs(job))


@routes.get("/jobs/{job_id}/checkpoints")
async def job_checkpoints(request: web.Request) -> web.Response:
    job = await _job(request)
    found = await _scan(request, job)
    means = loss_history.epoch_means(await asyncio.to_thread(request.app[STORE].loss, job.id))
    return web.json_response(checkpoints.listing(job, found, means))


def _parse_epoch(raw: str, job: Job) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6):
        raise NotFound(f"Job {job.id} has no saved epoch '{raw}'.")
    return int(raw)


@routes.post("/jobs/{job_id}/checkpoints/{epoch}/publish")
async def publish_checkpoint(request: web.Request) -> web.Response:
    lock = _publish_locks.setdefault(request.app, asyncio.Lock())
    async with lock:
        job = await _job(request)  # read under the lock: it sees what a publish just before it recorded
        epoch = _parse_epoch(request.match_info["epoch"], job)
        found = [c for c in await _scan(request, job) if c.epoch == epoch]
        if not found:
            raise NotFound(f"Job {job.id} has no saved epoch {epoch}.",
                           hint=f"GET /jobs/{job.id}/checkpoints lists the epochs it saved.")
        checkpoint = next((c for c in found if c.complete), None)
        if checkpoint is None:
            raise Conflict(f"Epoch {epoch} of job {job.id} is still being saved.", hint="Try again in a moment.")
        done = checkpoints.published_of(job, checkpoint)
        if done is not None and await asyncio.to_thread(Path(done.artifact).is_file):
            return web.json_response(_body(epoch, done), status=200)
        published = await asyncio.to_thread(_publish, request, job, checkpoint)
        try:
            await asyncio.to_thread(request.app[STORE].set_published, job.id, epoch, published)
        except sqlite3.IntegrityError as exc:  # deleted meanwhile; the copy stays, as a job's final LoRA does
            raise NotFound(f"Job {job.id} was deleted; the epoch was copied to {published.artifact}.") from exc
    return web.json_response(_body(epoch, published), status=201)


def _publish(request: web.Request, job: Job, checkpoint: checkpoints.Checkpoint) -> PublishedEpoch:
    try:
        publish.verify_lora(checkpoint.path, expected_arch=job.params.get("arch"))
    except publish.PublishError as exc:  # complete, but not a LoRA ED could use
        raise Conflict(exc.message, hint=exc.hint) from exc
    lora_dir = request.app[CONFIG].current.ed_lora_dir
    try:
        return checkpoints.copy_epoch(checkpoint, lora_dir, output_name(job))
    except publish.PublishError as exc:  # the LoRA folder cannot take it
        raise Unavailable(exc.message, hint=exc.hint) from exc


def _body(epoch: int, published: PublishedEpoch) -> dict[str, object]:
    return {"epoch": epoch, "lora_id": published.lora_id, "artifact": published.artifact}
