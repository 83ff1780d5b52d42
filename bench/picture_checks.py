"""Benchmark: the picture warnings (POST /pictures/check) for 25 camera JPEGs (12 MP, ~4.5 MB each).

Times, per picture: the checks in-process (daemon/pipeline/picture_checks.check_pictures with the daemon's
worker count), and the whole request through a real daemon (`python -m daemon`, upload included). Baselines in
the same run: a full decode of each picture one after the other (what any look at every pixel costs without
JPEG draft scaling) and /train's cheap request-time check (dataset.check_image). Goal: 25 pictures in a few
seconds on a 2-core machine.

    python bench/picture_checks.py [--images 25] [--repeat 3] [--resolution 512]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.camera import camera_jpeg  # noqa: E402
from bench.upload_speed import wait_healthy, write_config  # noqa: E402
from daemon.pipeline import picture_checks  # noqa: E402
from daemon.pipeline.dataset import Upload, check_image, prep_workers  # noqa: E402
from tests.helpers import TOKEN, free_port  # noqa: E402


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def full_decode(files: list[Path]) -> None:
    for f in files:
        with Image.open(f) as img:
            img.load()


async def post_check(url: str, pictures: list[bytes], resolution: int) -> tuple[float, dict]:
    form = aiohttp.FormData()
    for i, data in enumerate(pictures):
        form.add_field("images", data, filename=f"IMG_{i:04d}.jpg", content_type="image/jpeg")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        start = time.perf_counter()
        async with session.post(f"{url}/pictures/check?resolution={resolution}", data=form) as resp:
            body = await resp.json()
            elapsed = time.perf_counter() - start
    if resp.status != 200:
        raise SystemExit(f"POST /pictures/check answered {resp.status}: {body}")
    return elapsed, body


async def through_daemon(root: Path, pictures: list[bytes], args: argparse.Namespace) -> tuple[list[float], dict]:
    port = free_port()
    config = write_config(root, port)
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config)], cwd=REPO, env=os.environ,
                              stdout=subprocess.DEVNULL, stderr=(root / "daemon.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    times, body = [], {}
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, url)
        for _ in range(args.repeat):
            elapsed, body = await post_check(url, pictures, args.resolution)
            times.append(elapsed)
    finally:
        daemon.terminate()
        daemon.wait(30)
    return times, body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pictures = [camera_jpeg(i, portrait=i % 4 == 3) for i in range(args.images)]
        files = []
        for i, data in enumerate(pictures):
            files.append(root / f"{i:03d}.jpg")
            files[-1].write_bytes(data)
        n = len(files)
        items = [(f, f.name) for f in files]
        workers = prep_workers(n)
        decode = [timed(lambda: full_decode(files)) for _ in range(args.repeat)]
        cheap = [timed(lambda: [check_image(Upload(f, f.name)) for f in files]) for _ in range(args.repeat)]
        checks = [timed(lambda: picture_checks.check_pictures(items, args.resolution, workers=workers))
                  for _ in range(args.repeat)]
        http, body = asyncio.run(through_daemon(root, pictures, args))
        with Image.open(files[0]) as first:
            size = first.size
    mb = sum(len(p) for p in pictures) / n / 1e6
    print(f"{n} camera JPEGs {size[0]}×{size[1]} (~{mb:.1f} MB each), resolution {args.resolution}, "
          f"{os.cpu_count()} CPUs, {workers} check threads; median of {args.repeat}")
    rows = [
        ("baseline: full decode, one after the other", decode),
        ("baseline: /train's request-time check (check_image)", cheap),
        ("check_pictures in-process", checks),
        ("POST /pictures/check through the daemon (upload included)", http),
    ]
    for label, values in rows:
        med = statistics.median(values)
        print(f"  {label:<60} {med:6.2f} s total  {1000 * med / n:6.0f} ms/picture")
    codes = sorted({w["code"] for p in body["pictures"] for w in p["warnings"]} | {w["code"] for w in body["set"]})
    print(f"  warnings in the answer (synthetic gradients: alike/duplicate expected): {', '.join(codes) or 'none'}")


if __name__ == "__main__":
    main()
