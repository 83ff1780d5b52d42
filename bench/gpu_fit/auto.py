"""The standard character job through the real daemon with the automatic memory tier, as the tab sends it.

Starts `python -m daemon` on a generated config, posts the pictures to /train with `memory_tier: auto`,
follows the job on /ws and watches ED's LoRA folder for the published file.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.gpu_fit.measure import StepSample, images_per_s, steady_rate, warmup_steps
from bench.train_through_daemon import free_port, inspect_lora

REPO = Path(__file__).resolve().parents[2]
TOKEN = "bench-token-0123456789abcdef"
TRIGGER = "zkchar"
CLASS_TOKEN = "person"


@dataclass(frozen=True)
class AutoJob:
    sd_scripts: str
    python: str
    model: str
    tokenizer_cache: str
    pictures: list[bytes]
    params: dict[str, Any]  # the client's overrides; memory_tier auto is added
    cpu: bool
    work: Path  # the daemon's data and ED's lora folder go here
    log_dir: Path
    timeout_s: float | None


def daemon_config(job: AutoJob, port: int) -> dict[str, Any]:
    return {
        "port": port, "token": TOKEN, "data_dir": str(job.work / "data"), "ed_lora_dir": str(job.work / "lora"),
        "base_model": job.model, "allow_cpu": job.cpu,
        "kohya": {"script_path": str(Path(job.sd_scripts) / "train_network.py"), "workspace": job.sd_scripts,
                  "python": job.python, "tokenizer_cache_dir": job.tokenizer_cache},
    }


class _LoraWatch:
    """First time each LoRA file shows up in ED's folder (the daemon publishes by an atomic rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: dict[str, float] = {}

    def scan(self) -> None:
        if self.folder.is_dir():
            now = time.monotonic()
            for path in self.folder.glob("*.safetensors"):
                if not path.name.startswith("."):
                    self.seen.setdefault(path.name, now)

    async def run(self) -> None:
        while True:
            self.scan()
            await asyncio.sleep(0.05)


async def _wait_healthy(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode} before answering")
        try:
            async with session.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the daemon did not answer /health within 30 s")


async def _submit(session: aiohttp.ClientSession, url: str, job: AutoJob, params: dict[str, Any]) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("name", "Bench Character")
    form.add_field("trigger", TRIGGER)
    form.add_field("class_token", CLASS_TOKEN)
    form.add_field("params", json.dumps(params))
    for i, data in enumerate(job.pictures):
        form.add_field("images", data, filename=f"ref{i:02d}.jpg", content_type="image/jpeg")
    async with session.post(f"{url}/train", data=form, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return resp.status, await resp.json()


async def _fit_answer(session: aiohttp.ClientSession, url: str, images: int) -> dict[str, Any] | None:
    """What /fit says it would pick (helper FIT's endpoint); None on a daemon without it."""
    async with session.get(f"{url}/fit", params={"images": str(images)},
                           headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        if resp.status != 200:
            return None
        body = await resp.json()
    return {k: body.get(k) for k in ("arch", "tier", "tier_label", "reason", "gpu")}


async def _follow(ws: aiohttp.ClientWebSocketResponse, job_id: str, t0: float,
                  samples: list[StepSample], timeline: dict[str, float]) -> None:
    async for msg in ws:
        frame = json.loads(msg.data)
        if frame.get("job_id") != job_id:
            continue
        now = time.monotonic() - t0
        data = frame["data"]
        if frame["type"] == "state":
            timeline.setdefault(data["state"], now)
            print(f"    [{now:7.1f}s] {data['state']}", flush=True)
        elif frame["type"] == "progress" and data.get("step"):
            if not samples or samples[-1].step != data["step"]:
                samples.append(StepSample(now, int(data["step"]), str(data.get("phase", "training"))))
                if len(samples) == 1:
                    print(f"    [{now:7.1f}s] first step ({data['step']}/{data['total']})", flush=True)
        elif frame["type"] == "result":
            timeline["result"] = now
            return


async def _train(session: aiohttp.ClientSession, url: str, job: AutoJob, report: dict[str, Any]) -> str | None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(f"{url}/config/test", headers=auth) as resp:
        ready = await resp.json()
    report["config_test"] = {c["name"]: c["detail"] for c in ready.get("checks", [])}
    if not ready.get("ready"):
        bad = [f"{c['name']}: {c['detail']}" for c in ready.get("checks", []) if not c.get("ok")]
        report["error"] = "daemon not ready: " + "; ".join(bad)
        return None
    report["fit"] = await _fit_answer(session, url, len(job.pictures))
    watch = _LoraWatch(job.work / "lora")
    watcher = asyncio.create_task(watch.run())
    samples: list[StepSample] = []
    timeline: dict[str, float] = {}
    try:
        async with session.ws_connect(f"{url}/ws?token={TOKEN}") as ws:
            t_click = time.monotonic()
            status, body = await _submit(session, url, job, {**job.params, "memory_tier": "auto"})
            if status == 400 and isinstance(body, dict) and body.get("key") == "memory_tier":
                # A daemon from before the memory tiers: its presets are what "automatic" means there.
                report["memory_tier_refused"] = body.get("error")
                t_click = time.monotonic()
                status, body = await _submit(session, url, job, job.params)
            t0 = time.monotonic()
            report["upload_s"] = round(t0 - t_click, 3)
            if status != 202:
                report["error"] = f"/train answered {status}: {body.get('error') if isinstance(body, dict) else body}"
                return None
            job_id = str(body["job_id"])
            try:
                await asyncio.wait_for(_follow(ws, job_id, t0, samples, timeline), job.timeout_s)
            except asyncio.TimeoutError:
                report["error"] = f"stopped after {job.timeout_s:.0f} s (the time budget): job cancelled"
                await session.post(f"{url}/jobs/{job_id}/cancel", headers=auth)
                await asyncio.sleep(2)
    finally:
        watcher.cancel()
        # The result frame can beat the next poll: a file published since is stamped now (<= 50 ms late).
        watch.scan()
    async with session.get(f"{url}/jobs/{job_id}/status", headers=auth) as resp:
        status_body = await resp.json()
    report.update(_summary(status_body, samples, timeline, watch.seen, t0))
    if "memory_tier_refused" in report:
        report["memory_tier"] = None  # the stored value is TrainParams' default, not a choice this daemon made
    return job_id


def _summary(job: dict[str, Any], samples: list[StepSample], timeline: dict[str, float], seen: dict[str, float],
             t0: float) -> dict[str, Any]:
    params = job.get("params") or {}
    total = (job.get("progress") or {}).get("total") or (samples[-1].step if samples else 0)
    rate = steady_rate(samples, warmup_steps(total)) if total else None
    artifact = job.get("artifact")
    published = seen.get(Path(artifact).name) if artifact else None
    return {
        "state": job.get("state"), "job_error": job.get("error"),
        # The tier and the levers it set; .get: a daemon from before the tiers stores no memory_tier.
        "memory_tier": params.get("memory_tier"), "batch_size": params.get("batch_size"),
        "mixed_precision": params.get("mixed_precision"), "optimizer": params.get("optimizer"),
        "gradient_checkpointing": params.get("gradient_checkpointing"), "resolution": params.get("resolution"),
        "params": params, "total_steps": total,
        "first_step_s": samples[0].t if samples else None,
        "steady_steps_per_s": rate, "steady_images_per_s": images_per_s(rate, params.get("batch_size")),
        "tqdm_rate_last": (job.get("progress") or {}).get("rate"),
        "click_to_lora_s": (published - t0) if published is not None else None,
        "result_s": timeline.get("result"), "timeline_s": timeline,
        "artifact": artifact, "lora": inspect_lora(artifact) if artifact and Path(artifact).exists() else None,
    }


async def run_auto(job: AutoJob, peak_mib: Callable[[float, float], int | None]) -> dict[str, Any]:
    """Everything measured about the daemon's job; `error` says why something is missing."""
    job.work.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg_path = job.work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(daemon_config(job, port)), encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"images": len(job.pictures), "params_sent": job.params}
    t_start = time.monotonic()
    with (job.log_dir / "daemon.log").open("wb") as daemon_log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg_path)], cwd=REPO,
                                stdout=daemon_log, stderr=subprocess.STDOUT)
        job_id = None
        try:
            async with aiohttp.ClientSession() as session:
                await _wait_healthy(session, url, proc)
                job_id = await _train(session, url, job, report)
        except (RuntimeError, aiohttp.ClientError, OSError) as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    report["peak_mib"] = peak_mib(t_start, time.monotonic())
    if job_id is not None:
        trainer_log = job.work / "data" / "jobs" / job_id / "trainer.log"
        if trainer_log.exists():
            shutil.copy(trainer_log, job.log_dir / "trainer.log")
    return report
