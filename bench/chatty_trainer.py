"""Benchmark: a chatty trainer (issue 6 §4). The kohya test double prints N MB of kohya-shaped log lines
before it trains, saves and exits 0; the daemon runs in this process so its event loop can be watched.

Prints, for the current tree and (with --baseline-rev) for an older commit of the daemon in the same run:
the job's final state, wall time from POST /train to the end, the event loop's lag while the job ran
(p50 / p99 / max of a 10 ms sleep's overshoot), how many log lines the job's GET /logs answer carries
and its size, and the parser's own throughput on the same text (one thread, nothing else running).

    .venv/bin/python bench/chatty_trainer.py [--mb 32] [--baseline-rev 985f014]

The baseline tree is taken with `git archive` into a temporary folder; the test double (with its
KOHYA_DOUBLE_FLOOD_MB knob) always comes from the current tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "kohya_double" / "train_network.py"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def flood_text(megabytes: float) -> str:
    """The same lines the double prints with --console_log_simple (what the daemon passes)."""
    lines: list[str] = []
    size, n, target = 0, 0, int(megabytes * 1024 * 1024)
    while size < target:
        line = f"caching latents: bucket {n % 64} image {n} of the flood, size (512, 512) -> (64, 64)\n"
        lines.append(line)
        size += len(line)
        n += 1
    return "".join(lines)


def parse_throughput(text: str) -> float:
    """MB/s of the tree's own output parsing, fed in 64 KiB chunks as the pipe reader gets them."""
    from daemon.pipeline import progress

    chunks = [text[i : i + 65536] for i in range(0, len(text), 65536)]
    start = time.perf_counter()
    if hasattr(progress, "OutputParser"):
        parser = progress.OutputParser()
        for chunk in chunks:
            parser.feed("stdout", chunk)
        parser.finish()
    else:  # the code path before issue 6: runner._consume per chunk
        splitter, tracker = progress.LineSplitter(), progress.ProgressTracker()
        for chunk in chunks:
            for line in splitter.feed(chunk):
                tracker.feed_line(line)
                [p.rstrip() for p in progress.split_glued_line(line) if "%|" not in p]
    return len(text.encode()) / 1e6 / (time.perf_counter() - start)


async def run_job(megabytes: float, root: Path) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from daemon.pipeline.env_check import GpuInfo
    from daemon.web.app import create_app
    from tests.helpers import TOKEN, free_port, make_config, picture_bytes

    os.environ["KOHYA_DOUBLE_FLOOD_MB"] = str(megabytes)
    os.environ["KOHYA_DOUBLE_STEP_SECONDS"] = "0.01"
    port = free_port()
    config = make_config(root, port=port, kohya={"script_path": str(DOUBLE)})
    app = create_app(config, gpu_probe=lambda: GpuInfo(cuda=False, error="bench", probed_at=time.time()))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    lags: list[float] = []
    watching = True

    async def watch_loop() -> None:
        loop = asyncio.get_running_loop()
        while watching:
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    watcher = asyncio.create_task(watch_loop())
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            form = aiohttp.FormData()
            form.add_field("name", "Chatty")
            form.add_field("trigger", "ohwx")
            form.add_field("params", json.dumps({"epochs": 1}))
            for i in range(8):
                form.add_field("images", picture_bytes(i), filename=f"p{i}.png", content_type="image/png")
            start = time.monotonic()
            async with http.post(f"{base}/train", data=form) as resp:
                body = await resp.json()
                if "job_id" not in body:
                    raise SystemExit(f"POST /train answered {resp.status}: {body}")
                job_id = body["job_id"]
            while True:
                async with http.get(f"{base}/jobs/{job_id}/status") as resp:
                    job = await resp.json()
                if job["state"] in ("done", "error", "cancelled", "interrupted") or time.monotonic() - start > 600:
                    break
                await asyncio.sleep(0.2)
            wall = time.monotonic() - start
            async with http.get(f"{base}/jobs/{job_id}/logs") as resp:
                logs_body = await resp.read()
                logs_status = resp.status
    finally:
        watching = False
        await watcher
        await runner.cleanup()
    return {
        "state": job["state"],
        "error": (job.get("error") or {}).get("kind"),
        "wall_s": round(wall, 2),
        "lag_p50_ms": round(statistics.median(lags) * 1000, 1),
        "lag_p99_ms": round(percentile(lags, 99) * 1000, 1),
        "lag_max_ms": round(max(lags) * 1000, 1),
        "logs_status": logs_status,
        "logs_lines": len(json.loads(logs_body).get("lines", [])) if logs_status == 200 else None,
        "logs_bytes": len(logs_body),
        "trainer_log_mb": round((config.jobs_dir / job_id / "trainer.log").stat().st_size / 1e6, 1),
    }


def child(megabytes: float) -> None:
    with tempfile.TemporaryDirectory(prefix="chatty-") as tmp:
        result = asyncio.run(run_job(megabytes, Path(tmp)))
    result["parse_mb_s"] = round(parse_throughput(flood_text(megabytes)), 1)
    print("RESULT " + json.dumps(result), flush=True)


def run_tree(tree: Path, megabytes: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--mb", str(megabytes)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"the run in {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def export_rev(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=32.0)
    parser.add_argument("--baseline-rev", help="a commit of the daemon to measure beside the current tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.mb)
        return
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="chatty-base-") as tmp:
        if args.baseline_rev:
            rows.append((f"baseline {args.baseline_rev}", run_tree(export_rev(args.baseline_rev, Path(tmp)), args.mb)))
        rows.append(("current tree", run_tree(REPO, args.mb)))
    print(f"chatty trainer: {args.mb:g} MB of log lines, then 8 steps, save, exit 0 (cores: {os.cpu_count()})")
    keys = ["state", "error", "wall_s", "lag_p50_ms", "lag_p99_ms", "lag_max_ms", "parse_mb_s",
            "logs_status", "logs_lines", "logs_bytes", "trainer_log_mb"]
    print(f"{'':>22} " + " ".join(f"{k:>14}" for k in keys))
    for label, row in rows:
        print(f"{label:>22} " + " ".join(f"{row.get(k)!s:>14}" for k in keys))


if __name__ == "__main__":
    main()
