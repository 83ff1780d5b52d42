"""Benchmark: POST /train with 25 camera JPEGs (~4.5 MB each) against copying the same bytes on this disk.

Starts a real daemon (`python -m daemon`, kohya test double as the trainer, as tests/helpers.make_config sets
it up), uploads the pictures as the ED tab does and times the request until its 202. Baselines in the same run:
copying the same files from one folder to another (the least any upload must cost: the daemon streams each
part to disk), and the old request-time check (a full decode of every picture, sequential), beside what a
1/8-scale draft decode of every picture would cost. Goal: 202 within 10x the copy.

    python bench/upload_speed.py [--images 25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.camera import camera_jpeg  # noqa: E402
from tests.helpers import KOHYA_DOUBLE, TOKEN, free_port, write_sd1_checkpoint  # noqa: E402


def write_config(root: Path, port: int) -> Path:
    models = root / "ed" / "models"
    write_sd1_checkpoint(models / "stable-diffusion" / "sd-test.safetensors")
    (root / "workspace").mkdir()
    raw = {
        "port": port,
        "token": TOKEN,
        "data_dir": str(root / "data"),
        "ed_lora_dir": str(models / "lora"),
        "ed_models_dir": str(models),
        "base_model": str(models / "stable-diffusion" / "sd-test.safetensors"),
        "allow_cpu": True,
        "kohya": {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(root / "workspace")},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def copy_files(files: list[Path], dst: Path) -> float:
    dst.mkdir()
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
    return time.perf_counter() - start


def decode_all(files: list[Path], *, draft: bool) -> float:
    start = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            if draft:
                img.draft("RGB", (1, 1))  # 1/8 scale: no IDCT to speak of, but every entropy-coded byte is read
            img.load()
    return time.perf_counter() - start


async def wait_healthy(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the daemon did not start")


async def post_train(session: aiohttp.ClientSession, url: str, pictures: list[bytes]) -> tuple[float, str]:
    form = aiohttp.FormData()
    form.add_field("name", "Upload Bench")
    form.add_field("trigger", "ohwx")
    form.add_field("params", '{"epochs": 1, "repeats": 1, "save_every_n_epochs": 0}')
    for i, data in enumerate(pictures):
        form.add_field("images", data, filename=f"IMG_{i:04d}.jpg", content_type="image/jpeg")
    start = time.perf_counter()
    async with session.post(f"{url}/train", data=form) as resp:
        body = await resp.json()
        elapsed = time.perf_counter() - start
    if resp.status != 202:
        raise SystemExit(f"POST /train answered {resp.status}: {body}")
    return elapsed, body["job_id"]


async def wait_finished(session: aiohttp.ClientSession, url: str, job_id: str) -> str:
    while True:
        async with session.get(f"{url}/jobs/{job_id}/status") as resp:
            job = await resp.json()
        if job["state"] in ("done", "error", "cancelled", "interrupted"):
            return str(job["state"])
        await asyncio.sleep(0.2)


async def bench(args: argparse.Namespace, root: Path) -> None:
    pictures = [camera_jpeg(i, portrait=i % 4 == 3) for i in range(args.images)]
    total = sum(len(p) for p in pictures)
    src = root / "src"
    src.mkdir()
    files = []
    for i, data in enumerate(pictures):
        files.append(src / f"{i:03d}.jpg")
        files[-1].write_bytes(data)
    port = free_port()
    config = write_config(root, port)
    env = {**os.environ, "KOHYA_DOUBLE_STEP_SECONDS": "0"}
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=(root / "daemon.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    posts, copies = [], []
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            await wait_healthy(session, url)
            for r in range(args.repeat):
                copies.append(copy_files(files, root / f"copy{r}"))
                elapsed, job_id = await post_train(session, url, pictures)
                posts.append(elapsed)
                # The job preps and trains (the double) before the next upload, so they do not compete.
                state = await wait_finished(session, url, job_id)
                if state != "done":
                    raise SystemExit(f"job {job_id} ended {state}; see {root / 'daemon.log'}")
    finally:
        daemon.terminate()
        daemon.wait(30)
    decode, draft = decode_all(files, draft=False), decode_all(files, draft=True)
    post, copy = statistics.median(posts), statistics.median(copies)
    print(f"{args.images} JPEGs 12 MP, {total / 1e6:.0f} MB in all; {os.cpu_count()} cores")
    print(f"copy the same files     : median {copy:6.3f} s  (runs: {', '.join(f'{c:.3f}' for c in copies)})")
    print(f"POST /train until 202   : median {post:6.3f} s  (runs: {', '.join(f'{p:.3f}' for p in posts)})")
    print(f"ratio POST / copy       : {post / copy:.1f}x   goal <= 10x: {'met' if post / copy <= 10 else 'NOT met'}")
    if hasattr(os, "getloadavg"):
        print(f"load average            : {os.getloadavg()[0]:.2f} (1 min) at the end")
    print(f"old check (full decode of every file, in the request): {decode:.2f} s on its own;"
          f" a 1/8-scale draft decode of every file would still take {draft:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    try:
        asyncio.run(bench(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
