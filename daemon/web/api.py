"""HTTP handlers: parse the request, call one function, answer JSON."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from daemon import __version__
from daemon.config import Config
from daemon.errors import BadInput, NotFound, database_error, disk_errors
from daemon.instance_id import instance_id
from daemon.jobs import fields
from daemon.jobs.models import Job
from daemon.jobs.store import LOG_RING
from daemon.pipeline import base_models, captions, dataset, trainer_log
from daemon.pipeline.env_check import check_face_crop, check_tagger, run_checks, tokenizer_readiness
from daemon.pipeline.fit import AUTO, TIER_LABELS, tiers_json
from daemon.pipeline.model_arch import (
    ARCH_LABELS,
    TRAINABLE_ARCHS,
    Arch,
    detect_arch,
    family_note,
    untrainable_reason,
)
from daemon.pipeline.params import DEFAULT_PRESET, presets_for, resolve_params
from daemon.pipeline.runner import job_paths
from daemon.web.keys import CONFIG, GPU, QUEUE, STORE
from daemon.web.tagger_api import TAGGER
from daemon.web.uploads import UPLOAD_SLOTS, read_train_form, upload_limits

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    # instance/pid/config let the ED server plugin tell its own daemon from one left over by another config.
    return web.json_response({"status": "ok", "version": __version__,
                              "instance": instance_id(config.path, config.data_dir), "pid": os.getpid(),
                              "config": os.path.abspath(config.path) if config.path is not None else None})


def _graceful_exit() -> None:
    raise web.GracefulExit()


class Shutdown:
    """Stops the daemon once. A second request while it stops changes nothing: a second GracefulExit raised
    during the cleanup would cut short the stopping of the trainer."""

    def __init__(self, stop: Callable[[], None] = _graceful_exit) -> None:
        self.requested = False
        self._stop = stop

    def request(self) -> None:
        if self.requested:
            return
        self.requested = True
        log.info("shutdown requested over HTTP")
        # GracefulExit is what run_app's own SIGINT handler raises; a loop callback raising it works on Windows
        # too, and the answer still goes out: aiohttp's graceful shutdown lets running handlers finish.
        asyncio.get_running_loop().call_soon(self._stop)


SHUTDOWN = web.AppKey("shutdown", Shutdown)


@routes.post("/shutdown")
async def shutdown(request: web.Request) -> web.Response:
    """Stop as on Ctrl+C: answer, then the trainer tree is killed, its job marked interrupted, and
    `python -m daemon` exits 0."""
    request.app[SHUTDOWN].request()
    return web.json_response({"stopping": True}, status=202)


@routes.post("/config/test")
async def config_test(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    gpu = await request.app[GPU].get(refresh=True)

    async def in_turn() -> tuple:
        checks = await asyncio.to_thread(run_checks, config, gpu)
        # Per family and never blocking: SDXL's second tokenizer missing must not stop SD 1.x jobs.
        tokenizers = await asyncio.to_thread(tokenizer_readiness, config)
        # Optional, never blocking: automatic tags (issue 10).
        tagger = await asyncio.to_thread(check_tagger, config, request.app[TAGGER].probe, refresh=True)
        return checks, tokenizers, tagger

    # The face crop's check starts a python (OpenCV's import): alongside the others, not after them. gather,
    # so that when one side raises, the other's outcome is still collected rather than left unawaited.
    (checks, tokenizers, tagger), face_crop = await asyncio.gather(
        in_turn(), asyncio.to_thread(check_face_crop, config))  # face crop: optional, never in "ready"
    return web.json_response({
        "ready": all(c.ok for c in checks),
        "lora_dir": str(config.ed_lora_dir),
        # What jobs will train on: "cuda", "cpu" (no GPU, allow_cpu) or null (no GPU, not allowed).
        "device": "cuda" if gpu.cuda else ("cpu" if config.allow_cpu else None),
        "gpu": {"name": gpu.name, "vram_gb": gpu.vram_gb} if gpu.cuda else None,
        "checks": [c.to_json() for c in checks],
        "tokenizers": {arch: check.to_json() for arch, check in tokenizers.items()},
        "tagger": tagger.to_json(),
        "face_crop": face_crop.to_json(),
    })


@routes.get("/presets")
async def presets(request: web.Request) -> web.Response:
    """How much to train, per family (`?arch=sd1|sdxl`); batch sizes are the presets' reference batches."""
    arch = request.query.get("arch", "sd1")
    return web.json_response({
        "presets": {name: preset.to_json() for name, preset in presets_for(arch).items()},
        "default": DEFAULT_PRESET,
    })


def _model_json(file: str, arch: Arch, **extra: str) -> dict[str, object]:
    why = untrainable_reason(arch, file)
    note = family_note(arch, file)
    return {**extra, "file": file, "arch": arch, "trainable": why is None, **({"why": why} if why else {}),
            **({"note": note} if note else {})}


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    found = await asyncio.to_thread(base_models.describe_models, config.ed_models_dir)
    default = None
    if config.base_model is not None:
        default = _model_json(config.base_model.name, await asyncio.to_thread(detect_arch, config.base_model))
    return web.json_response({"models": [_model_json(m.path.name, m.arch, id=m.id) for m in found],
                              "default": default, "supported_archs": list(TRAINABLE_ARCHS)})


FIT_QUERY_KEYS = ("base_model", "preset", "memory_tier", "images")


@routes.get("/fit")
async def fit(request: web.Request) -> web.Response:
    """The memory tier and the settings a job would get on this machine. Uses the cached GPU probe only."""
    config = request.app[CONFIG].current
    query = request.query
    unknown = sorted(k for k in query if k not in FIT_QUERY_KEYS)
    if unknown:
        raise BadInput(f"Unknown query parameter '{unknown[0]}'; allowed: {', '.join(FIT_QUERY_KEYS)}.",
                       key=unknown[0])
    images = _query_int(query, "images", default=20, low=1, high=dataset.MAX_IMAGES)
    base = await _base_model(config, query.get("base_model"))
    arch = await asyncio.to_thread(detect_arch, base)
    gpu = await request.app[GPU].get()
    answer: dict[str, object] = {
        "arch": arch, "arch_label": ARCH_LABELS[arch],
        "gpu": {"cuda": gpu.cuda, "name": gpu.name, "vram_gb": gpu.vram_gb, "bf16": gpu.bf16},
        "tiers": tiers_json(),
    }
    why = untrainable_reason(arch, base.name)
    if why is not None:
        return web.json_response({**answer, "trainable": False, "why": why})
    note = family_note(arch, base.name)
    trained_as = training_arch(arch)
    overrides = {"preset": query.get("preset", DEFAULT_PRESET), "memory_tier": query.get("memory_tier", AUTO)}
    # No lever is set by hand here, so the params' tier and reason are the fit's own.
    params = resolve_params(overrides, image_count=images, arch=trained_as, gpu=gpu)
    return web.json_response({**answer, "trainable": True, **({"note": note} if note else {}),
                              "tier": params.memory_tier, "tier_label": TIER_LABELS[params.memory_tier],
                              "auto": overrides["memory_tier"] == AUTO, "reason": params.fit_reason,
                              "params": params.to_json()})


def training_arch(arch: Arch) -> str:
    # An unreadable family (.ckpt) is trained as SD 1.x, as before the daemon knew SDXL; kohya says if it is not.
    return "sdxl" if arch == "sdxl" else "sd1"


async def _base_model(config: Config, requested: str | None) -> Path:
    """The checkpoint a client names (an ED model id, never a path), or the configured default."""
    if requested is not None:
        _check_text("base_model", requested)
    base = await asyncio.to_thread(base_models.resolve_model, requested, models_dir=config.ed_models_dir,
                                   default=config.base_model)
    if not base.exists():
        raise BadInput(f"The base model {base} does not exist.", key="base_model",
                       hint="Fix base_model in the daemon config or pick a model in Easy Diffusion.")
    return base


@routes.post("/train")
async def train(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    queue = request.app[QUEUE]
    await queue.check_room()  # a full queue is said before a single picture is uploaded
    with request.app[UPLOAD_SLOTS].take(config.max_uploads):
        form = await read_train_form(request, tmp_root=config.data_dir / "tmp", limits=upload_limits(config),
                                     check_text=_check_text)
        paths = None
        try:
            job = await _new_job(request, form.fields, form.uploads)
            sent = fields.parse_captions(form.fields.get("captions"), count=len(form.uploads))
            paths = job_paths(config, job.id)
            with disk_errors(config.jobs_dir):
                paths.root.mkdir(parents=True)
                await asyncio.to_thread(dataset.write_upload_names, form.tmp_dir, form.uploads)
                if sent is not None:
                    await asyncio.to_thread(captions.write_captions, form.tmp_dir, [u.path.name for u in form.uploads],
                                            captions.clean_all(sent, job.trigger))
                await asyncio.to_thread(shutil.move, str(form.tmp_dir), str(paths.uploads))
            try:
                await queue.submit(job)
            except sqlite3.Error as exc:
                error = database_error(exc, config.db_path)
                if error is None:
                    raise
                raise error from exc
        except BaseException:
            shutil.rmtree(form.tmp_dir, ignore_errors=True)
            if paths is not None:
                shutil.rmtree(paths.root, ignore_errors=True)
            raise
    return web.json_response({"job_id": job.id, "state": job.state.value}, status=202)


MAX_BASE_MODEL_CHARS = 255


def _check_text(name: str, value: str) -> None:
    """Each text field as soon as it arrives: a bad one stops the upload before more pictures are stored."""
    if name == "name":
        fields.check_name(value)
    elif name == "trigger":
        fields.check_trigger(value)
    elif name == "class_token":
        fields.check_class_token(value)
    elif name == "params":
        fields.parse_params(value)
    elif name == "captions":
        fields.parse_captions(value)  # the count is checked once all pictures are in
    elif name == "base_model" and (len(value) > MAX_BASE_MODEL_CHARS or fields.has_control(value)):
        raise BadInput("'base_model' must be the file name of a model Easy Diffusion lists.", key="base_model")


async def _new_job(request: web.Request, form: dict[str, str], uploads: list[dataset.Upload]) -> Job:
    config = request.app[CONFIG].current
    name = fields.check_name(form.get("name"))
    trigger = fields.check_trigger(form.get("trigger"))
    class_token = fields.check_class_token(form.get("class_token"))
    base = await _base_model(config, form.get("base_model"))
    arch = await asyncio.to_thread(detect_arch, base)
    why = untrainable_reason(arch, base.name)
    if why is not None:
        raise BadInput(why, key="base_model")
    overrides = fields.parse_params(form.get("params"))
    dataset.check_count(len(uploads))
    await asyncio.to_thread(dataset.check_images, uploads)
    gpu = await request.app[GPU].get()
    params = resolve_params(overrides, image_count=len(uploads), arch=training_arch(arch), gpu=gpu)
    job = Job(
        id=uuid.uuid4().hex[:12],
        name=name,
        trigger=trigger,
        class_token=class_token,
        base_model=str(base),
        params=params.to_json(),
        image_count=len(uploads),
        created_at=time.time(),
    )
    log.info("job %s: %s, %s tier: %s", job.id, ARCH_LABELS[arch], params.memory_tier, params.fit_reason)
    return job


@routes.get("/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    jobs = await asyncio.to_thread(request.app[STORE].list)
    return web.json_response({"jobs": [j.to_json() for j in jobs]})


@routes.get("/jobs/{job_id}/status")
async def job_status(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(request.app[STORE].get, request.match_info["job_id"])
    if job is None:
        raise NotFound(f"There is no job {request.match_info['job_id']}.")
    return web.json_response(job.to_json())


@routes.get("/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    store = request.app[STORE]
    if await asyncio.to_thread(store.get, job_id) is None:
        raise NotFound(f"There is no job {job_id}.")
    return web.json_response({"events": await asyncio.to_thread(store.events, job_id)})


@routes.get("/jobs/{job_id}/logs")
async def job_logs(request: web.Request) -> web.Response:
    """The job's last lines (`?tail=N`, default and at most the LOG_RING lines the database keeps), or a
    page of its full trainer.log (`?offset=<byte>&limit=<bytes>`, answered with `next_offset`)."""
    job_id = request.match_info["job_id"]
    store = request.app[STORE]
    job = await asyncio.to_thread(store.get, job_id)
    if job is None:
        raise NotFound(f"There is no job {job_id}.")
    query = request.query
    if "offset" in query or "limit" in query:
        if "tail" in query:
            raise BadInput("Ask for either ?tail= or ?offset=&limit=, not both.", key="tail")
        offset = _query_int(query, "offset", default=0, low=0, high=2**62)
        limit = _query_int(query, "limit", default=trainer_log.DEFAULT_PAGE_BYTES, low=1,
                           high=trainer_log.MAX_PAGE_BYTES)
        path = job_paths(request.app[CONFIG].current, job.id).trainer_log
        page = await asyncio.to_thread(trainer_log.read_page, path, offset, limit, final=job.state.finished)
        return web.json_response(page.to_json())
    tail = _query_int(query, "tail", default=LOG_RING, low=1, high=LOG_RING)
    return web.json_response({"lines": await asyncio.to_thread(store.logs, job_id, tail)})


def _query_int(query: Mapping[str, str], name: str, *, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or not low <= int(raw) <= high:
        raise BadInput(f"'{name}' must be a whole number from {low} to {high}.", key=name)
    return int(raw)


@routes.get("/jobs/{job_id}/samples/{file}")
async def job_sample(request: web.Request) -> web.StreamResponse:
    job_id, file = request.match_info["job_id"], request.match_info["file"]
    job = await asyncio.to_thread(request.app[STORE].get, job_id)
    if job is None:
        raise NotFound(f"There is no job {job_id}.")
    # Only names the daemon itself recorded from kohya's sample folder are served.
    if file not in job.samples:
        raise NotFound(f"Job {job_id} has no preview picture '{file}'.")
    path = await asyncio.to_thread(_sample_path, job_paths(request.app[CONFIG].current, job.id).samples, file)
    if path is None:
        raise NotFound(f"The preview picture '{file}' was deleted.")
    return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})


def _sample_path(folder: Path, file: str) -> Path | None:
    """The real file inside `folder`, or None: a symlink (even one pointing inside) is never followed."""
    path = folder / file
    if folder.is_symlink() or path.is_symlink() or not path.is_file():
        return None
    real = path.resolve()
    return real if real.is_relative_to(folder.resolve()) else None


@routes.post("/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    queue = request.app[QUEUE]
    job_id = request.match_info["job_id"]
    await queue.cancel(job_id)
    job = await queue.wait_finished(job_id, timeout=15)
    # 200 once the job has stopped (cancelled, or done if the LoRA was already being copied); 202 while
    # the trainer is still being stopped.
    return web.json_response(job.to_json(), status=200 if job.state.finished else 202)


@routes.post("/jobs/{job_id}/resume")
async def resume_job(request: web.Request) -> web.Response:
    """An interrupted job is queued again: from its saved kohya state when it has one, else from the first step."""
    job = await request.app[QUEUE].resume(request.match_info["job_id"])
    return web.json_response(job.to_json(), status=202)


@routes.delete("/jobs/{job_id}")
async def delete_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    await request.app[QUEUE].delete(job_id)
    return web.json_response({"deleted": job_id})
