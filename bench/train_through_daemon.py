"""Benchmark: one real kohya training driven through the daemon, as the ED tab drives it.

Starts `python -m daemon --config <generated>` as a subprocess, checks /config/test, uploads N synthetic
pictures to /train, follows the job on /ws, optionally cancels a second job mid-training, and prints the
numbers: time to the first step, steps/s and images/s over the steady part, wall time, peak GPU memory
(nvidia-smi, when present), and what the published LoRA holds. Writes the same as JSON to --out.

    python bench/train_through_daemon.py --sd-scripts SD --model CKPT --tokenizer-cache TOK \
        [--python PY | --accelerate ACC] [--images 20] [--params '{"epochs": 2}'] [--cancel-second] --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def picture(index: int, size: int = 640) -> bytes:
    """A 'character': the same figure in different poses and colours of background."""
    rnd = random.Random(index)
    img = Image.new("RGB", (size, int(size * rnd.uniform(0.75, 1.33))), tuple(rnd.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    cx, cy = rnd.randrange(size // 4, 3 * size // 4), rnd.randrange(size // 4, 3 * img.height // 4)
    draw.ellipse((cx - 60, cy - 160, cx + 60, cy - 40), fill=(240, 200, 160))
    draw.rectangle((cx - 70, cy - 40, cx + 70, cy + 160), fill=(200, 30, 60))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class GpuMemory(threading.Thread):
    """Peak `memory.used` of GPU 0 by polling nvidia-smi (the trainer runs in another process)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()

    def run(self) -> None:
        while self.available and not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def stop(self) -> None:
        self._stop.set()


async def follow(session: aiohttp.ClientSession, url: str, token: str, job_id: str, t0: float,
                 cancel_after_steps: int | None = None) -> dict[str, Any]:
    timeline: dict[str, float] = {}
    steps: list[tuple[float, int]] = []
    result: dict[str, Any] = {}
    async with session.ws_connect(f"{url}/ws?token={token}") as ws:
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["job_id"] != job_id:
                continue
            now = time.monotonic() - t0
            if frame["type"] == "state":
                timeline.setdefault(frame["data"]["state"], now)
                print(f"[{now:7.1f}s] state {frame['data']['state']}", flush=True)
            elif frame["type"] == "progress":
                p = frame["data"]
                if p["step"] and (not steps or steps[-1][1] != p["step"]):
                    steps.append((now, p["step"]))
                    if p["step"] in (1, p["total"]) or p["step"] % 25 == 0:
                        print(f"[{now:7.1f}s] step {p['step']}/{p['total']} epoch {p['epoch']}/{p['epochs']} "
                              f"loss {p['loss']} rate {p['rate']} eta {p['eta_s']}", flush=True)
                if cancel_after_steps is not None and p["step"] >= cancel_after_steps:
                    cancel_after_steps = None
                    timeline["cancel_sent"] = now
                    await session.post(f"{url}/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
            elif frame["type"] == "checkpoint":
                print(f"[{now:7.1f}s] checkpoint {frame['data']['file']}", flush=True)
            elif frame["type"] == "result":
                timeline["result"] = now
                result = frame["data"]
                break
    return {"timeline": timeline, "steps": steps, "result": result}


def steady_rate(steps: list[tuple[float, int]]) -> float | None:
    """Steps per second between the first fifth and the last step (start-up excluded)."""
    if len(steps) < 5:
        return None
    a = steps[len(steps) // 5]
    b = steps[-1]
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else None


def inspect_lora(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as fh:
        keys = list(fh.keys())
        meta = fh.metadata() or {}
        dtype = str(fh.get_tensor(next(k for k in keys if k.endswith("lora_up.weight"))).dtype)
    return {
        "tensors": len(keys),
        "alphas": sum(k.endswith(".alpha") for k in keys),
        "lora_te": sum(1 for k in keys if k.startswith("lora_te")),
        "lora_unet": sum(1 for k in keys if k.startswith("lora_unet")),
        "dtype": dtype,
        "bytes": os.path.getsize(path),
        "ss_base_model_version": meta.get("ss_base_model_version"),
        "ss_mixed_precision": meta.get("ss_mixed_precision"),
        "ss_optimizer": meta.get("ss_optimizer"),
        "ss_steps": meta.get("ss_steps"),
        "modelspec.trigger_phrase": meta.get("modelspec.trigger_phrase"),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = "bench-token-0123456789abcdef"
    sd_scripts = os.path.abspath(args.sd_scripts)
    # abspath, not resolve(): a venv's python is a symlink that must keep its venv path.
    kohya: dict[str, Any] = {"script_path": os.path.join(sd_scripts, "train_network.py"), "workspace": sd_scripts,
                             "tokenizer_cache_dir": os.path.abspath(args.tokenizer_cache)}
    if args.python:
        kohya["python"] = os.path.abspath(args.python)
    if args.accelerate:
        kohya["accelerate_bin"] = args.accelerate
    cfg = {"port": port, "token": token, "data_dir": str(work / "data"), "ed_lora_dir": str(work / "lora"),
           "base_model": os.path.abspath(args.model), "allow_cpu": args.allow_cpu, "kohya": kohya}
    cfg_path = work / "config.yaml"
    work.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    daemon_log = (out / "daemon.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg_path)], cwd=REPO,
                            stdout=daemon_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    gpu = GpuMemory()
    gpu.start()
    report: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{url}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            async with session.post(f"{url}/config/test", headers=auth) as resp:
                ready = await resp.json()
            for check in ready["checks"]:
                print(f"check {check['name']:16} {'ok ' if check['ok'] else 'BAD'} {check['detail']}", flush=True)
            report["config_test"] = ready
            if not ready["ready"]:
                raise SystemExit("daemon not ready")

            async def submit(name: str) -> str:
                form = aiohttp.FormData()
                form.add_field("name", name)
                form.add_field("trigger", "zkchar")
                form.add_field("class_token", "person")
                form.add_field("params", args.params)
                for i in range(args.images):
                    form.add_field("images", picture(i), filename=f"ref{i:02d}.jpg", content_type="image/jpeg")
                async with session.post(f"{url}/train", data=form, headers=auth) as resp:
                    body = await resp.json()
                    if resp.status != 202:
                        raise SystemExit(f"/train refused: {body}")
                    return str(body["job_id"])

            t0 = time.monotonic()
            job_id = await submit("Bench Character")
            run = await follow(session, url, token, job_id, t0)
            async with session.get(f"{url}/jobs/{job_id}/status", headers=auth) as resp:
                job = await resp.json()
            rate = steady_rate(run["steps"])
            first_step = run["steps"][0][0] if run["steps"] else None
            report["job"] = {
                "state": job["state"], "error": job["error"], "params": job["params"],
                "total_steps": job["progress"]["total"], "wall_s": run["timeline"].get("result"),
                "timeline_s": run["timeline"], "first_step_s": first_step, "steady_steps_per_s": rate,
                "steady_images_per_s": rate * job["params"]["batch_size"] if rate else None,
                "artifact": job["artifact"], "lora_id": job["lora_id"],
                "lora": inspect_lora(job["artifact"]) if job["artifact"] else None,
                "samples": [x["file"] for x in job["samples"]],
            }
            if job["samples"]:  # kohya's own preview, fetched the way the tab fetches it
                async with session.get(url + job["samples"][-1]["url"], headers=auth) as resp:
                    (out / "last-sample.png").write_bytes(await resp.read())
            shutil.copy(work / "data" / "jobs" / job_id / "trainer.log", out / "trainer.log")
            if args.cancel_second:
                t1 = time.monotonic()
                second = await submit("Bench Cancel")
                cancelled = await follow(session, url, token, second, t1, cancel_after_steps=3)
                report["cancel"] = {"result": cancelled["result"], "timeline_s": cancelled["timeline"]}
    finally:
        gpu.stop()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        daemon_log.close()
    report["gpu_peak_mib"] = gpu.peak_mib if gpu.available else None
    leftovers = subprocess.run(["pgrep", "-f", "train_network.py"], capture_output=True, text=True).stdout.split()
    report["trainer_processes_after_shutdown"] = leftovers
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd-scripts", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer-cache", required=True)
    ap.add_argument("--python", help="kohya venv python (runs the script directly)")
    ap.add_argument("--accelerate", help="accelerate launcher (when --python is not given)")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--allow-cpu", action="store_true")
    ap.add_argument("--cancel-second", action="store_true")
    ap.add_argument("--work", default="/tmp/lora-bench")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    job = report["job"]
    print(json.dumps({k: job[k] for k in ("state", "total_steps", "wall_s", "first_step_s", "steady_steps_per_s",
                                          "steady_images_per_s")}, indent=2))
    print("lora:", json.dumps(job["lora"]))
    print("samples:", job["samples"])
    print("gpu peak MiB:", report["gpu_peak_mib"], "| cancel:", json.dumps(report.get("cancel", {}).get("result")))
    print("trainer processes left after daemon shutdown:", report["trainer_processes_after_shutdown"])


if __name__ == "__main__":
    main()
