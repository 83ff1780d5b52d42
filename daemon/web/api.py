"""HTTP handlers: parse the request, call one function, answer JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from typing import Any

from aiohttp import web

from daemon import __version__
from daemon.errors import BadInput, NotFound
from daemon.jobs import fields
from daemon.jobs.models import Job
from daemon.pipeline import base_models, dataset
from daemon.pipeline.env_check import run_checks
from daemon.pipeline.model_arch import ARCH_LABELS, TRAINABLE_ARCHS, detect_arch
from daemon.pipeline.params import PRESETS, resolve_params
from daemon.pipeline.runner import job_paths
from daemon.web.keys import CONFIG, GPU, QUEUE, STORE
from daemon.web.uploads import read_train_form

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


@routes.post("/config/test")
async def config_test(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    gpu = await request.app[GPU].get(refresh=True)
    checks = await asyncio.to_thread(run_checks, config, gpu)
    return web.json_response({
        "ready": all(c.ok for c in checks),
        "lora_dir": str(config.ed_lora_dir),
        # What jobs will train on: "cuda", "cpu" (no GPU, allow_cpu) or null (no GPU, not allowed).
        "device": "cuda" if gpu.cuda else ("cpu" if config.allow_cpu else None),
        "gpu": {"name": gpu.name, "vram_gb": gpu.vram_gb} if gpu.cuda else None,
        "checks": [c.to_json() for c in checks],
    })


@routes.get("/presets")
async def presets(request: web.Request) -> web.Response:
    return web.json_response({
        "presets": {name: preset.to_json() for name, preset in PRESETS.items()},
        "default": "balanced",
    })


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    found = await asyncio.to_thread(base_models.describe_models, config.ed_models_dir)
    default = None
    if config.base_model is not None:
        default = {"file": config.base_model.name, "arch": await asyncio.to_thread(detect_arch, config.base_model)}
    return web.json_response({"models": [m.to_json() for m in found], "default": default,
                              "supported_archs": list(TRAINABLE_ARCHS)})


@routes.post("/train")
async def train(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    form = await read_train_form(
        request,
        tmp_root=config.data_dir / "tmp",
        max_file=config.max_image_bytes,
        max_total=config.max_request_bytes,
    )
    paths = None
    try:
        job = await _new_job(request, form.fields, form.uploads)
        paths = job_paths(config, job.id)
        paths.root.mkdir(parents=True)
        await asyncio.to_thread(dataset.write_upload_names, form.tmp_dir, form.uploads)
        await asyncio.to_thread(shutil.move, str(form.tmp_dir), str(paths.uploads))
    except BaseException:
        shutil.rmtree(form.tmp_dir, ignore_errors=True)
        if paths is not None:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    await request.app[QUEUE].submit(job)
    return web.json_response({"job_id": job.id, "state": job.state.value}, status=202)


async def _new_job(request: web.Request, form: dict[str, str], uploads: list[dataset.Upload]) -> Job:
    config = request.app[CONFIG]
    name = fields.check_name(form.get("name"))
    trigger = fields.check_trigger(form.get("trigger"))
    class_token = fields.check_class_token(form.get("class_token"))
    base = await asyncio.to_thread(base_models.resolve_model, form.get("base_model"),
                                   models_dir=config.ed_models_dir, default=config.base_model)
    if not base.exists():
        raise BadInput(f"The base model {base} does not exist.", key="base_model",
                       hint="Fix base_model in the daemon config or pick a model in Easy Diffusion.")
    arch = await asyncio.to_thread(detect_arch, base)
    if arch not in TRAINABLE_ARCHS and arch != "unknown":
        raise BadInput(
            f"{base.name} is an {ARCH_LABELS[arch]} model; only SD 1.x models can be trained for now.",
            key="base_model", hint="Choose an SD 1.x checkpoint such as sd-v1-5.")
    overrides = _parse_params(form.get("params"))
    dataset.check_count(len(uploads))
    await asyncio.to_thread(dataset.check_images, uploads)
    gpu = await request.app[GPU].get()
    params = resolve_params(overrides, image_count=len(uploads), cpu=not gpu.cuda)
    return Job(
        id=uuid.uuid4().hex[:12],
        name=name,
        trigger=trigger,
        class_token=class_token,
        base_model=str(base),
        params=params.to_json(),
        image_count=len(uploads),
        created_at=time.time(),
    )


def _parse_params(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadInput(f"'params' is not valid JSON: {exc.msg}.", key="params") from exc
    if not isinstance(value, dict):
        raise BadInput("'params' must be a JSON object such as {\"epochs\": 10}.", key="params")
    return value


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
    job_id = request.match_info["job_id"]
    store = request.app[STORE]
    if await asyncio.to_thread(store.get, job_id) is None:
        raise NotFound(f"There is no job {job_id}.")
    return web.json_response({"lines": await asyncio.to_thread(store.logs, job_id)})


@routes.get("/jobs/{job_id}/samples/{file}")
async def job_sample(request: web.Request) -> web.StreamResponse:
    job_id, file = request.match_info["job_id"], request.match_info["file"]
    job = await asyncio.to_thread(request.app[STORE].get, job_id)
    if job is None:
        raise NotFound(f"There is no job {job_id}.")
    # Only names the daemon itself recorded from kohya's sample folder are served.
    if file not in job.samples:
        raise NotFound(f"Job {job_id} has no preview picture '{file}'.")
    path = job_paths(request.app[CONFIG], job.id).samples / file
    if not path.is_file():
        raise NotFound(f"The preview picture '{file}' was deleted.")
    return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})


@routes.post("/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    queue = request.app[QUEUE]
    job_id = request.match_info["job_id"]
    await queue.cancel(job_id)
    job = await queue.wait_finished(job_id, timeout=15)
    # 200 once the job has stopped (cancelled, or done if the LoRA was already being copied); 202 while
    # the trainer is still being stopped.
    return web.json_response(job.to_json(), status=200 if job.state.finished else 202)


@routes.delete("/jobs/{job_id}")
async def delete_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    await request.app[QUEUE].delete(job_id)
    return web.json_response({"deleted": job_id})
