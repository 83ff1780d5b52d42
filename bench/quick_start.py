"""Benchmark (issue 9 §3): click → first training step through the real daemon and the real sd-scripts, with
each fast-start cut off and on in the same run.

For every repeat, every mode runs once, baseline first (modes interleaved, so a slow spell of the machine hits
them alike): a fresh daemon (`python -m daemon`) with that mode's setting, the base checkpoint evicted from the page
cache (--cold, Linux; a user's first click after a reboot), one POST /train with the same pictures, followed on /ws
until the first training step is reported; then the job is cancelled and the daemon stopped.

    python -m bench.quick_start --kohya-sd DIR --kohya-python PY --model CKPT --tokenizer-cache DIR \
        [--data DIR] [--images N] [--resolution PX] [--repeats N] [--modes off,on,...] [--budget-s S] \
        [--out FILE.json] [--work DIR] [--no-cold]

Modes: off (fast_start: false: the daemon before issue 9), on (fast_start: true: every cut), standby (on, and the
tab opened --tab-lead-s before the click: GET /models, so the daemon's standby trainer has done kohya's imports; the
click waits for it to be ready, as a user choosing pictures would), or some cuts joined by '+' (warm, prestart,
latent_cache, model_hash, vae_batch; e.g. warm+prestart). The JSON (--out) is written again after every run.
latent_cache pays only on a rerun of the same job
(a first click has no latents to reuse); model_hash needs warm and prestart.
Prints a progress line per event (flushed), then a table (median per mode, its ratio to the first mode) and
writes everything to --out. Ends within --budget-s: a run that would not fit is not started.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.startup_phases import MARKERS

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789abcdef"
CUTS = ("warm", "prestart", "latent_cache", "model_hash", "vae_batch")
STANDBY = "standby"  # on + the standby trainer: the tab is opened --tab-lead-s before the click
STANDBY_READY = "standby-*-go.json.ready"  # daemon/pipeline/standby.py's ready file in the data folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# How the daemon is started for a mode that keeps only some cuts: fast_start.CUTS narrowed before it runs.
LAUNCHER = ("import sys, runpy; import daemon.pipeline.fast_start as f; f.CUTS = frozenset(sys.argv.pop(1).split(','));"
            " sys.argv[0] = 'daemon'; runpy.run_module('daemon', run_name='__main__', alter_sys=True)")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("off", "on", STANDBY) and not set(m.split("+")) <= set(CUTS)]
    if not modes or bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"modes are distinct items, each off, on or cuts joined by '+' from "
                                         f"{', '.join(CUTS)} (got {text!r})")
    return modes


def mode_settings(mode: str) -> tuple[bool, str | None]:
    """(config fast_start, the cuts to keep, comma-separated, or None for all) of a mode."""
    if mode == "off":
        return False, None
    if mode in ("on", STANDBY):
        return True, None
    return True, mode.replace("+", ",")


@dataclass
class RunResult:
    mode: str
    repeat: int
    first_step_s: float | None = None  # POST /train sent → the first progress frame with step >= 1
    training_s: float | None = None  # → state `training` (the pictures are prepared)
    accepted_s: float | None = None  # → the 202 answer (upload done)
    state: str | None = None
    error: str | None = None
    load_before: float | None = None  # 1-min load average when the run started
    events: list[str] = field(default_factory=list)
    # click → the log frame carrying kohya's first line of each phase (bench.startup_phases.MARKERS' labels name
    # the phase that ENDS there); the daemon sends log lines in batches at most 0.3 s apart
    marks: dict[str, float] = field(default_factory=dict)
    standby_ready_s: float | None = None  # standby mode: tab opened → the standby's imports done
    standby_rss_mib: float | None = None  # its resident memory while it waits (psutil RSS)


def summarize(runs: list[RunResult], modes: list[str]) -> dict[str, dict[str, Any]]:
    """Median click → first step per mode and its ratio to the first mode's median."""
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        got = [r.first_step_s for r in runs if r.mode == mode and r.first_step_s is not None]
        prep = [r.training_s for r in runs if r.mode == mode and r.training_s is not None]
        out[mode] = {"runs": got, "median_s": statistics.median(got) if got else None,
                     "median_to_training_s": statistics.median(prep) if prep else None}
    base = out[modes[0]]["median_s"] if modes else None
    for mode in modes:
        med = out[mode]["median_s"]
        out[mode]["ratio"] = med / base if med is not None and base else None
        out[mode]["saved_s"] = base - med if med is not None and base is not None else None
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    def num(v: float | None, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    modes = list(summary)
    lines = [f"| mode | click → first step: each run (s) | median (s) | vs {modes[0]} | saved (s) | "
             "click → training state, median (s) |", "|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        each = ", ".join(num(v) for v in s["runs"]) or "-"
        lines.append(f"| {mode} | {each} | {num(s['median_s'])} | {num(s['ratio'], '×{:.2f}')} | "
                     f"{num(s['saved_s'])} | {num(s['median_to_training_s'])} |")
    return "\n".join(lines)


def mark_lines(marks: dict[str, float], lines: list[str], now: float) -> None:
    """Note `now` for each kohya phase marker first seen in `lines`."""
    for label, rx in MARKERS:
        if label not in marks and any(re.search(rx, line.encode("utf-8", "replace")) for line in lines):
            marks[label] = now


def phase_table(runs: list[RunResult], modes: list[str]) -> str:
    """Median click → each of kohya's phase ends, per mode (cumulative seconds)."""
    lines = ["| click → kohya's line ending the phase (median s) | " + " | ".join(modes) + " |",
             "|---|" + "---|" * len(modes)]
    for label, _ in MARKERS:
        row = []
        for mode in modes:
            got = [r.marks[label] for r in runs if r.mode == mode and label in r.marks]
            row.append(f"{statistics.median(got):.2f}" if got else "-")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def first_step_at(frame: dict[str, Any]) -> bool:
    return frame.get("type") == "progress" and int(frame.get("data", {}).get("step") or 0) >= 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def synthetic_picture(index: int, size: int = 640) -> tuple[str, bytes]:
    from PIL import Image, ImageDraw

    rnd = random.Random(index)
    img = Image.new("RGB", (size, int(size * rnd.uniform(0.75, 1.33))), tuple(rnd.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    cx, cy = size // 2, img.height // 2
    draw.ellipse((cx - 60, cy - 160, cx + 60, cy - 40), fill=(240, 200, 160))
    draw.rectangle((cx - 70, cy - 40, cx + 70, cy + 160), fill=(200, 30, 60))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return f"pic{index:02d}.jpg", buf.getvalue()


def pictures(data: Path | None, count: int) -> list[tuple[str, bytes]]:
    if data is None:
        return [synthetic_picture(i) for i in range(count)]
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise SystemExit(f"no pictures under {data}")
    return [(f"pic{i:02d}{p.suffix.lower()}", p.read_bytes()) for i, p in enumerate(files)]


def evict(path: Path) -> bool:
    """Drop the file's pages from the page cache (Linux; clean pages need no privileges)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def has_cuda_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, text=True).returncode == 0


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def one_run(args: argparse.Namespace, mode: str, repeat: int, pics: list[tuple[str, bytes]],
                  params: dict[str, Any]) -> RunResult:
    import aiohttp
    import yaml

    result = RunResult(mode=mode, repeat=repeat, load_before=round(os.getloadavg()[0], 2)
                       if hasattr(os, "getloadavg") else None)
    work = Path(args.work).resolve() / f"{mode}-{repeat}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    fast, cuts = mode_settings(mode)
    sd = os.path.abspath(args.kohya_sd)
    cfg = {"port": port, "token": TOKEN, "data_dir": str(work / "data"), "ed_lora_dir": str(work / "lora"),
           "base_model": os.path.abspath(args.model), "allow_cpu": True, "fast_start": fast,
           "kohya": {"script_path": os.path.join(sd, "train_network.py"), "workspace": sd,
                     "python": os.path.abspath(args.kohya_python),
                     "tokenizer_cache_dir": os.path.abspath(args.tokenizer_cache)}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    launch = [sys.executable, "-c", LAUNCHER, cuts] if cuts else [sys.executable, "-m", "daemon"]
    daemon_log = (work / "daemon.log").open("w")
    proc = subprocess.Popen([*launch, "--config", str(work / "config.yaml")], cwd=REPO, stdout=daemon_log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(f"{url}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the daemon did not start; see {work / 'daemon.log'}")
            if mode == STANDBY:
                await open_tab(session, url, auth, work / "data", proc.pid, args, result)
            if args.cold:
                evict(Path(args.model))
            async with session.ws_connect(f"{url}/ws?token={TOKEN}") as ws:
                form = aiohttp.FormData()
                form.add_field("name", f"Quick {mode.replace('+', '-')} {repeat}")  # names allow no +
                form.add_field("trigger", "zkchar")
                form.add_field("params", json.dumps(params))
                for name, data in pics:
                    form.add_field("images", data, filename=name)
                t0 = time.monotonic()
                async with session.post(f"{url}/train", data=form, headers=auth) as resp:
                    body = await resp.json()
                result.accepted_s = round(time.monotonic() - t0, 3)
                if resp.status != 202:
                    raise RuntimeError(f"/train refused: {body}")
                job_id = body["job_id"]
                deadline = t0 + args.run_timeout_s
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        result.error = f"no first step within {args.run_timeout_s:.0f} s"
                        break
                    try:
                        msg = await ws.receive(timeout=left)
                    except TimeoutError:
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        result.error = f"websocket closed ({msg.type})"
                        break
                    frame = json.loads(msg.data)
                    if frame.get("job_id") != job_id:
                        continue
                    now = round(time.monotonic() - t0, 3)
                    if frame["type"] == "state":
                        state = frame["data"]["state"]
                        result.events.append(f"{now:.2f} {state}")
                        if state == "training":
                            result.training_s = now
                        if state in ("error", "cancelled", "done"):
                            result.state = state
                            result.error = (frame["data"].get("error") or {}).get("message")
                            break
                    elif frame["type"] == "log":
                        mark_lines(result.marks, frame["data"].get("lines") or [], now)
                    elif first_step_at(frame):
                        result.first_step_s = now
                        result.state = "training"
                        break
            async with session.post(f"{url}/jobs/{job_id}/cancel", headers=auth) as resp:
                await resp.read()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        daemon_log.close()
    for log_file in (work / "data" / "jobs").glob("*/trainer.log"):
        shutil.copy(log_file, work / "trainer.log")  # kohya's own lines, for bench/startup_phases-style reading
    if not args.keep:
        shutil.rmtree(work / "data" / "jobs", ignore_errors=True)
    return result


def standby_rss(daemon_pid: int) -> float | None:
    """MiB resident of the daemon's standby trainer (kohya_prestart.py), None when there is none."""
    import psutil

    try:
        for child in psutil.Process(daemon_pid).children(recursive=True):
            if any(arg.endswith("kohya_prestart.py") for arg in child.cmdline()):
                return round(child.memory_info().rss / 2**20, 1)
    except psutil.Error:
        pass
    return None


async def open_tab(session: Any, url: str, auth: dict[str, str], data_dir: Path, daemon_pid: int,
                   args: argparse.Namespace, result: RunResult) -> None:
    """GET /models as the tab does when it opens; return once the standby is ready and --tab-lead-s has passed."""
    t0 = time.monotonic()
    async with session.get(f"{url}/models", headers=auth) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET /models answered {resp.status}")
    while not list(data_dir.glob(STANDBY_READY)):
        if time.monotonic() - t0 > args.run_timeout_s:
            raise RuntimeError("the standby trainer was not ready in time")
        await asyncio.sleep(0.05)
    result.standby_ready_s = round(time.monotonic() - t0, 3)
    result.standby_rss_mib = standby_rss(daemon_pid)
    await asyncio.sleep(max(0.0, args.tab_lead_s - (time.monotonic() - t0)))


def standby_line(runs: list[RunResult]) -> str:
    ready = [r.standby_ready_s for r in runs if r.standby_ready_s is not None]
    rss = [r.standby_rss_mib for r in runs if r.standby_rss_mib is not None]
    if not ready:
        return "standby: no run"
    mem = f"{statistics.median(rss):.0f} MiB" if rss else "-"
    return f"standby: tab opened → ready (imports done), median {statistics.median(ready):.2f} s; idle RSS {mem}"


def report_of(args: argparse.Namespace, params: dict[str, Any], pics: int, gpu: bool, runs: list[RunResult],
              stopped: str | None, wall_s: float) -> dict[str, Any]:
    return {"params": params, "pictures": pics, "gpu": gpu, "cold": args.cold, "modes": args.modes,
            "repeats": args.repeats, "stopped_early": stopped, "wall_s": round(wall_s, 1),
            "runs": [asdict(r) for r in runs], "summary": summarize(runs, args.modes)}


def write_report(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
        os.replace(tmp, path)  # a device run cut short still leaves a whole file


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    gpu = has_cuda_gpu()
    resolution = args.resolution or (512 if gpu else 256)
    params = {"resolution": resolution, "epochs": 1, "repeats": 1, "batch_size": args.batch_size,
              "network_dim": 4, "network_alpha": 1, "save_every_n_epochs": 0, "sample_every_n_epochs": 0}
    pics = pictures(Path(args.data) if args.data else None, args.images)
    log(f"quick_start: modes {','.join(args.modes)}, {args.repeats} repeat(s), {len(pics)} pictures at "
        f"{resolution} px, "
        f"{'CUDA GPU' if gpu else 'CPU'}, checkpoint {'evicted before each run' if args.cold else 'as cached'}, "
        f"budget {args.budget_s:.0f} s")
    runs: list[RunResult] = []
    longest = 0.0
    stopped = None
    for repeat in range(1, args.repeats + 1):
        for mode in args.modes:
            elapsed = time.monotonic() - start
            if longest and elapsed + 1.3 * longest > args.budget_s:
                stopped = f"budget: {elapsed:.0f} s used, a run takes up to {longest:.0f} s"
                break
            log(f"run {mode} #{repeat} (1-min load {os.getloadavg()[0]:.2f})" if hasattr(os, "getloadavg")
                else f"run {mode} #{repeat}")
            t = time.monotonic()
            try:
                r = await one_run(args, mode, repeat, pics, params)
            except Exception as exc:  # one broken run is reported, the others still count
                r = RunResult(mode=mode, repeat=repeat, error=f"{type(exc).__name__}: {exc}")
            longest = max(longest, time.monotonic() - t)
            runs.append(r)
            log(f"  {mode} #{repeat}: first step {r.first_step_s} s, training state {r.training_s} s"
                + (f", standby ready {r.standby_ready_s} s, RSS {r.standby_rss_mib} MiB" if mode == STANDBY else "")
                + (f", ERROR {r.error}" if r.error else ""))
            write_report(args.out, report_of(args, params, len(pics), gpu, runs, None, time.monotonic() - start))
        if stopped:
            log(f"stopped early ({stopped})")
            break
    return report_of(args, params, len(pics), gpu, runs, stopped, time.monotonic() - start)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.quick_start", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kohya-sd", required=True, help="the sd-scripts folder")
    ap.add_argument("--kohya-python", required=True, help="kohya venv's python")
    ap.add_argument("--model", required=True, help="SD1.5 single-file checkpoint")
    ap.add_argument("--tokenizer-cache", required=True, help="folder holding openai_clip-vit-large-patch14")
    ap.add_argument("--data", help="folder of pictures to upload (default: synthetic 640 px pictures)")
    ap.add_argument("--images", type=int, default=8, help="pictures per job (default 8)")
    ap.add_argument("--resolution", type=int, default=0, help="training resolution (default 512 on a GPU, 256 on CPU)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", type=parse_modes, default=["off", "on"],
                    help=f"comma list of off, on, or cuts joined by '+' ({', '.join(CUTS)})")
    ap.add_argument("--tab-lead-s", type=float, default=20,
                    help="standby mode: the tab is opened this long before the click, at least (default 20)")
    ap.add_argument("--budget-s", type=float, default=1800, help="start no run that would end after this")
    ap.add_argument("--run-timeout-s", type=float, default=600, help="give up on one run after this")
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                    help="evict the checkpoint from the page cache before each click (default on)")
    ap.add_argument("--work", default="/tmp/quick-start-bench")
    ap.add_argument("--keep", action="store_true", help="keep each job's folder (trainer.log) under --work")
    ap.add_argument("--out", help="write the results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(bench(args))
    print(table(report["summary"]), flush=True)
    print(phase_table([RunResult(**r) for r in report["runs"]], report["modes"]), flush=True)
    print(standby_line([RunResult(**r) for r in report["runs"]]), flush=True)
    if args.out:
        write_report(args.out, report)
        log(f"wrote {args.out}")
    return 0 if any(r["first_step_s"] is not None for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
