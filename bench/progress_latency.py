"""Benchmark: how late a training step reaches a WebSocket client (issue 6 §5).

A trainer-like child redraws kohya's tqdm `steps:` bar on stderr every --step-s seconds, as sd-scripts
does into a pipe (`\\r` + bar with its avr_loss, no newline; the shape of shared/kohya-logs/*/stderr.log),
and notes the wall time of each redraw. Measured, per redraw, from that write to the moment a client
holds it:

- `pipe`:   a plain reader of the child's stderr pipe (the floor: the OS and the child's flush);
- `daemon`: the daemon runs the child as its trainer (in this process, like `python -m daemon`), and an
            aiohttp WebSocket client on /ws receives the `progress` event carrying that step.

    .venv/bin/python bench/progress_latency.py [--steps 25] [--step-s 1.0] [--baseline-rev 985f014]

--baseline-rev measures an older commit of the daemon in the same run (git archive into a temp folder).
Goal: daemon p99 <= 350 ms at 1 s/step.
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
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import os, sys, time
steps, step_s, stamps = int(os.environ["BENCH_STEPS"]), float(os.environ["BENCH_STEP_S"]), os.environ["BENCH_STAMPS"]
print("running training / 学習開始", flush=True)
print(f"  total optimization steps / 学習ステップ数: {steps}", flush=True)
print("epoch 1/1", flush=True)

def fmt(seconds):
    return "%02d:%02d" % divmod(int(seconds), 60)

def bar(n, start, loss):
    frac = n / steps
    eighths = int(frac * 80)
    cells = ("█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths < 80 else "")).ljust(10)
    elapsed = time.monotonic() - start
    rate = n / elapsed if n and elapsed > 0 else 0
    timing = "[00:00<?, ?it/s" if not rate else (
        f"[{fmt(elapsed)}<{fmt((steps - n) / rate)}, " + (f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"))
    post = f", avr_loss={loss:.3g}" if loss is not None else ""
    return f"steps: {int(frac * 100):3d}%|{cells}| {n}/{steps} {timing}{post}]"

start = time.monotonic()
sys.stderr.write("\r" + bar(0, start, None)); sys.stderr.flush()
written = []
for n in range(1, steps + 1):
    time.sleep(step_s)
    written.append(time.time())
    sys.stderr.write("\r" + bar(n, start, 0.1 + 0.05 / n)); sys.stderr.flush()
sys.stderr.write("\n"); sys.stderr.flush()
with open(stamps, "w") as fh:
    fh.write(" ".join(map(repr, written)))
time.sleep(1)
'''


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in latencies]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1)}


def write_child(folder: Path) -> Path:
    path = folder / "tqdm_child.py"
    path.write_text(CHILD, encoding="utf-8")
    return path


def child_env(steps: int, step_s: float, stamps: Path) -> dict[str, str]:
    return {**os.environ, "BENCH_STEPS": str(steps), "BENCH_STEP_S": str(step_s), "BENCH_STAMPS": str(stamps),
            "PYTHONIOENCODING": "utf-8"}


def pipe_baseline(steps: int, step_s: float) -> dict[str, Any]:
    """The child read straight from its pipe: when does each step's first draw arrive?"""
    with tempfile.TemporaryDirectory(prefix="latency-pipe-") as tmp:
        stamps = Path(tmp) / "stamps"
        proc = subprocess.Popen([sys.executable, str(write_child(Path(tmp)))], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=child_env(steps, step_s, stamps))
        seen: dict[int, float] = {}
        buffer = ""
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 65536):
            now = time.time()
            buffer = (buffer + chunk.decode("utf-8", errors="replace"))[-4096:]
            for n in range(1, steps + 1):
                if n not in seen and f"| {n}/{steps} [" in buffer:
                    seen[n] = now
        proc.wait()
        written = [float(v) for v in stamps.read_text().split()]
    return summary([seen[n] - written[n - 1] for n in range(1, steps + 1)])


async def daemon_run(steps: int, step_s: float, root: Path) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from daemon.pipeline.env_check import GpuInfo
    from daemon.web.app import create_app
    from tests.helpers import TOKEN, free_port, make_config, picture_bytes

    stamps = root / "stamps"
    os.environ.update(child_env(steps, step_s, stamps))
    port = free_port()
    config = make_config(root, port=port, kohya={"script_path": str(write_child(root))})
    app = create_app(config, gpu_probe=lambda: GpuInfo(cuda=False, error="bench", probed_at=time.time()))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    seen: dict[int, float] = {}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws")
            form = aiohttp.FormData()
            form.add_field("name", "Latency")
            form.add_field("trigger", "ohwx")
            for i in range(8):
                form.add_field("images", picture_bytes(i), filename=f"p{i}.png", content_type="image/png")
            async with http.post(f"http://127.0.0.1:{port}/train", data=form) as resp:
                job_id = (await resp.json())["job_id"]
            deadline = time.monotonic() + steps * step_s + 120
            while len(seen) < steps and time.monotonic() < deadline:
                frame = await ws.receive_json(timeout=deadline - time.monotonic())
                now = time.time()
                if frame["type"] == "progress" and frame["job_id"] == job_id:
                    step = frame["data"]["step"]
                    if 1 <= step <= steps:
                        seen.setdefault(step, now)
                if frame["type"] == "result":
                    break
            for _ in range(100):  # the child writes its stamps when it is done
                if stamps.is_file():
                    break
                await asyncio.sleep(0.1)
            async with http.post(f"http://127.0.0.1:{port}/jobs/{job_id}/cancel"):
                pass
            await ws.close()
    finally:
        await runner.cleanup()
    written = [float(v) for v in stamps.read_text().split()]
    missing = [n for n in range(1, steps + 1) if n not in seen]
    result = summary([seen[n] - written[n - 1] for n in range(1, steps + 1) if n in seen])
    result["missed_steps"] = len(missing)
    return result


def child_main(steps: int, step_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        result = asyncio.run(daemon_run(steps, step_s, Path(tmp)))
    print("RESULT " + json.dumps(result), flush=True)


def run_tree(tree: Path, steps: int, step_s: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(steps), "--step-s", str(step_s)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=steps * step_s + 300)
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
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--step-s", type=float, default=1.0)
    parser.add_argument("--baseline-rev", help="a commit of the daemon to measure beside the current tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.steps, args.step_s)
        return
    rows: list[tuple[str, dict[str, Any]]] = []
    results: dict[str, Any] = {}
    pipe = threading.Thread(target=lambda: results.update(pipe=pipe_baseline(args.steps, args.step_s)))
    pipe.start()  # the pipe reader runs beside the daemon runs: the same machine load for both
    with tempfile.TemporaryDirectory(prefix="latency-base-") as tmp:
        if args.baseline_rev:
            rows.append((f"daemon {args.baseline_rev}",
                         run_tree(export_rev(args.baseline_rev, Path(tmp)), args.steps, args.step_s)))
        rows.append(("daemon (current tree)", run_tree(REPO, args.steps, args.step_s)))
    pipe.join()
    rows.insert(0, ("plain pipe reader", results["pipe"]))
    print(f"step written -> client holds it: {args.steps} steps at {args.step_s:g} s/step (cores: {os.cpu_count()})")
    keys = ["n", "p50_ms", "p99_ms", "max_ms", "missed_steps"]
    print(f"{'':>24} " + " ".join(f"{k:>12}" for k in keys))
    for label, row in rows:
        print(f"{label:>24} " + " ".join(f"{row.get(k, '')!s:>12}" for k in keys))


if __name__ == "__main__":
    main()
