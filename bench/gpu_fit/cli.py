"""Command line, prerequisites and the order of the runs (see the package docstring)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.gpu_fit.auto import CLASS_TOKEN, TRIGGER, AutoJob, run_auto
from bench.gpu_fit.gpumon import MemorySampler, gpu_facts
from bench.gpu_fit.hand import SCRIPTS, HandJob, dataset_document, hand_params, run_hand
from bench.gpu_fit.measure import (
    SKIPPED,
    SweepPoint,
    best_point,
    fits_budget,
    parse_batches,
    peak_between,
    sweep_stop_reason,
)
from bench.gpu_fit.report import table, verdicts
from bench.train_through_daemon import picture
from daemon.pipeline import dataset, kohya

# sd-scripts looks for the tokenizers under these names in --tokenizer_cache_dir.
TOKENIZERS = {"sd1": ["openai_clip-vit-large-patch14"],
              "sdxl": ["openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"]}
MODELS = {"sd15": ("sd1", "SD1.5"), "sdxl": ("sdxl", "SDXL")}
RESOLUTION = {"sd1": 512, "sdxl": 1024}
SMOKE_RESOLUTION = 256
# What a run costs before its first step on an H100 (imports, checkpoint load and hash, caching):
# shared/reference/kohya.md §9 measured 31-49 s for SD1.5; SDXL loads 3x the weights and caches two encoders.
FIRST_GUESS_S = {"sd1": 60.0, "sdxl": 150.0}
# The daemon job: start-up plus the standard job's ~2000 image views at a cautious images/s.
AUTO_GUESS_S = {"sd1": 90.0, "sdxl": 300.0}
# The smoke mode's job: the fewest pictures the daemon takes, one epoch of one repeat, a rank-4 LoRA.
SMOKE_PARAMS = {"resolution": SMOKE_RESOLUTION, "epochs": 1, "repeats": 1, "network_dim": 4, "network_alpha": 2,
                "save_every_n_epochs": 0, "sample_every_n_epochs": 0}
CUDA_PROBE = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
              "'cuda': c, 'name': torch.cuda.get_device_name(0) if c else None, "
              "'bf16': torch.cuda.is_bf16_supported() if c else None}))")


class Missing(Exception):
    """A prerequisite is missing: the message says which and what to pass."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_fit",
                                 description="the automatic memory tier against kohya tuned by hand "
                                 "(see bench/gpu_fit/__init__.py)")
    ap.add_argument("--kohya-sd", default=env("KOHYA_SD"), help="sd-scripts folder [$KOHYA_SD]")
    ap.add_argument("--kohya-python", default=env("KOHYA_PYTHON"), help="kohya venv's python [$KOHYA_PYTHON]")
    ap.add_argument("--sd15-model", default=env("KOHYA_MODEL"), help="SD1.5 checkpoint [$KOHYA_MODEL]")
    ap.add_argument("--sdxl-model", default=env("KOHYA_SDXL_MODEL"), help="SDXL checkpoint (optional) "
                    "[$KOHYA_SDXL_MODEL]")
    ap.add_argument("--tokenizer-cache", default=env("KOHYA_TOKENIZER_CACHE"),
                    help="kohya --tokenizer_cache_dir [$KOHYA_TOKENIZER_CACHE]")
    ap.add_argument("--out", default="bench-out/gpu_fit.json", help="the JSON report (logs go next to it)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--only", choices=("sd15", "sdxl"), help="bench one model only")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny CPU run proving the script end to end: 256 px, 8 pictures, 2 steps, batches 1,2")
    ap.add_argument("--images", type=int, help="pictures in the job (default 20; smoke 8, the daemon's minimum)")
    ap.add_argument("--params", help="JSON overrides for the daemon job (default {}; smoke: a tiny job)")
    ap.add_argument("--steps", type=int, help="steps of each hand run (default 30; smoke 2)")
    ap.add_argument("--sd15-batches", help="hand sweep for SD1.5 (default 1,2,4,8,16,32,48,64; smoke 1,2)")
    ap.add_argument("--sdxl-batches", default="1,2,4,8,16", help="hand sweep for SDXL")
    ap.add_argument("--hand-optimizer", help="optimizer of the hand runs (default: the daemon job's, AdamW if it "
                    "failed)")
    ap.add_argument("--full-sweep", action="store_true", help="go on after a batch size slower than the best")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget: runs that would not fit are skipped")
    ap.add_argument("--run-timeout-s", type=float, default=1800.0, help="cap on one training run")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.images = args.images or (dataset.MIN_IMAGES if smoke else 20)
    args.steps = args.steps or (2 if smoke else 30)
    args.sd15_batches = args.sd15_batches or ("1,2" if smoke else "1,2,4,8,16,32,48,64")
    if smoke:
        args.sdxl_model = None  # SDXL on a CPU needs ~20 GB of RAM and hours: the smoke mode is SD1.5 only
    return args


def job_params(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon job's overrides: --params, else none (the standard job), or the smoke mode's tiny job."""
    if args.params:
        value = json.loads(args.params)
        if not isinstance(value, dict):
            raise ValueError("--params must be a JSON object such as '{\"optimizer\": \"AdamW\"}'")
        return value
    return dict(SMOKE_PARAMS) if args.cpu_smoke else {}


def check_prerequisites(args: argparse.Namespace) -> list[str]:
    """Sentences naming each missing input; empty when the run can start."""
    problems: list[str] = []
    if args.cpu_smoke and args.only == "sdxl":
        return ["the CPU smoke mode trains SD1.5 only (SDXL on a CPU needs about 20 GB of RAM and hours)"]
    keys = [args.only] if args.only else ["sd15", "sdxl"]
    wanted = [k for k in keys if (args.sd15_model if k == "sd15" else args.sdxl_model) or k == args.only]
    if not wanted:
        problems.append("no model to bench: pass --sd15-model (and/or --sdxl-model)")
    if not args.kohya_sd or not Path(args.kohya_sd).is_dir():
        problems.append(f"no sd-scripts folder: pass --kohya-sd (got {args.kohya_sd!r})")
    else:
        for key in wanted:
            script = Path(args.kohya_sd) / SCRIPTS[MODELS[key][0]]
            if not script.is_file():
                problems.append(f"{script} does not exist (needed for {MODELS[key][1]})")
    if not args.kohya_python or not os.access(args.kohya_python, os.X_OK):
        problems.append("no kohya python: pass --kohya-python, the sd-scripts venv's python "
                        f"(got {args.kohya_python!r})")
    for key in wanted:
        model = args.sd15_model if key == "sd15" else args.sdxl_model
        if not model or not Path(model).is_file():
            problems.append(f"no {MODELS[key][1]} model: pass --{key}-model with a checkpoint file (got {model!r})")
    if not args.tokenizer_cache or not Path(args.tokenizer_cache).is_dir():
        problems.append(f"no tokenizer cache: pass --tokenizer-cache (got {args.tokenizer_cache!r})")
    else:
        for name in sorted({n for k in wanted for n in TOKENIZERS[MODELS[k][0]]}):
            if not (Path(args.tokenizer_cache) / name).is_dir():
                problems.append(f"the tokenizer cache has no {name}/ (kohya would try to download it)")
    for check in (lambda: parse_batches(args.sd15_batches), lambda: parse_batches(args.sdxl_batches),
                  lambda: job_params(args)):
        try:
            check()
        except ValueError as exc:  # json.JSONDecodeError is one
            problems.append(f"--params is not JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc))
    if not dataset.MIN_IMAGES <= args.images <= dataset.MAX_IMAGES:
        problems.append(f"--images must be from {dataset.MIN_IMAGES} to {dataset.MAX_IMAGES} (the daemon's limits)")
    return problems


def probe_cuda(python: str) -> dict[str, Any]:
    try:
        out = subprocess.run([python, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Missing(f"the kohya python could not run: {exc}") from exc
    if out.returncode != 0:
        raise Missing(f"the kohya python cannot import torch: {out.stderr.strip().splitlines()[-1:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class Run:
    """One benchmark run: the clock, the memory sampler and the report, saved after every measurement."""

    def __init__(self, args: argparse.Namespace, work: Path, started: float) -> None:
        self.args = args
        self.work = work
        self.out = Path(args.out).resolve()
        self.logs = self.out.parent / (self.out.stem + "-logs")
        self.deadline = started + args.budget_s if args.budget_s else None
        self.sampler = MemorySampler(enabled=not args.cpu_smoke)
        self.report: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "models": {}}

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def timeout(self) -> float:
        left = self.remaining()
        return self.args.run_timeout_s if left is None else max(1.0, min(left, self.args.run_timeout_s))

    def peak(self, start: float, end: float) -> int | None:
        return peak_between(self.sampler.samples, start, end) if self.sampler.enabled else None

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, self.out)

    def bench_model(self, key: str, model: str) -> None:
        arch, label = MODELS[key]
        args = self.args
        entry: dict[str, Any] = {"label": label, "model": model, "arch": arch}
        self.report["models"][key] = entry
        params = job_params(args)
        resolution = int(params.get("resolution", SMOKE_RESOLUTION if args.cpu_smoke else RESOLUTION[arch]))
        # Larger than the training resolution on the short side, so no bucket is smaller than a user's would be.
        pictures = [picture(i, size=math.ceil(resolution * 1.4)) for i in range(args.images)]
        print(f"== {label}: {model}", flush=True)
        left = self.remaining()
        if left is not None and left < AUTO_GUESS_S[arch]:
            entry["auto"] = {"error": f"skipped: {left:.0f} s of the time budget left"}
        else:
            print(f"  daemon job, memory_tier auto, {len(pictures)} pictures, params {json.dumps(params)}", flush=True)
            job = AutoJob(sd_scripts=str(Path(args.kohya_sd).resolve()), python=os.path.abspath(args.kohya_python),
                          model=os.path.abspath(model), tokenizer_cache=os.path.abspath(args.tokenizer_cache),
                          pictures=pictures, params=params, cpu=args.cpu_smoke, work=self.work / key / "daemon",
                          log_dir=self.logs / key / "daemon", timeout_s=self.remaining())
            entry["auto"] = asyncio.run(run_auto(job, self.peak))
        auto = entry["auto"]
        print(f"  daemon job: {auto.get('state')} {auto.get('error') or ''} tier {auto.get('memory_tier')} "
              f"batch {auto.get('batch_size')} images/s {auto.get('steady_images_per_s')} "
              f"click->LoRA {auto.get('click_to_lora_s')}", flush=True)
        self.save()
        entry["hand"] = self.sweep(arch, key, pictures, auto, resolution)
        best = entry["hand"].get("best")
        entry["verdicts"] = verdicts(key, auto, best, gpu_name=self.report.get("gpu", {}).get("name"),
                                     smoke=args.cpu_smoke)
        self.save()

    def sweep(self, arch: str, key: str, pictures: list[bytes], auto: dict[str, Any],
              resolution: int) -> dict[str, Any]:
        args = self.args
        auto_params = auto.get("params") or None
        optimizer = args.hand_optimizer or (None if auto.get("state") == "done" else "AdamW")
        hp = hand_params(arch, auto_params, resolution=resolution, images=len(pictures), optimizer=optimizer)
        folder = self.work / key / "hand"
        uploads_dir = folder / "uploads"
        uploads_dir.mkdir(parents=True, exist_ok=True)
        uploads = []
        for i, data in enumerate(pictures):
            path = uploads_dir / f"ref{i:02d}.jpg"
            path.write_bytes(data)
            uploads.append(dataset.Upload(path, path.name))
        # The daemon's own prep of the same bytes: the same pictures and buckets the daemon job trained on.
        dataset.prepare_images(uploads, folder / "img", size=hp["resolution"],
                               text=dataset.caption(TRIGGER, CLASS_TOKEN))
        toml = folder / "dataset.toml"
        kohya.write_dataset_config(toml, dataset_document(image_dir=str(folder / "img"), class_tokens=CLASS_TOKEN,
                                                          arch=arch, resolution=hp["resolution"],
                                                          repeats=hp["repeats"]))
        job = HandJob(arch=arch, sd_scripts=str(Path(args.kohya_sd).resolve()),
                      python=os.path.abspath(args.kohya_python),
                      model=os.path.abspath(args.sd15_model if key == "sd15" else args.sdxl_model),
                      tokenizer_cache=os.path.abspath(args.tokenizer_cache), dataset_config=str(toml),
                      network_dim=hp["network_dim"], network_alpha=hp["network_alpha"], unet_lr=hp["unet_lr"],
                      text_encoder_lr=hp["text_encoder_lr"], optimizer=hp["optimizer"], steps=args.steps,
                      cpu=args.cpu_smoke)
        out: dict[str, Any] = {"job": hp, "steps": args.steps, "runs": [], "stopped": None, "best": None}
        points: list[SweepPoint] = []
        batches = parse_batches(args.sd15_batches if key == "sd15" else args.sdxl_batches)
        (self.logs / key).mkdir(parents=True, exist_ok=True)
        for batch in batches:
            walls = [p.wall_s for p in points if p.wall_s]
            if not fits_budget(self.remaining(), walls, first_guess_s=FIRST_GUESS_S[arch]):
                left = [b for b in batches if b >= batch]
                out["stopped"] = f"time budget: {self.remaining():.0f} s left, batches {left} not run"
                points += [SweepPoint(b, SKIPPED, note="time budget") for b in left]
                break
            print(f"  kohya by hand, batch {batch}, {args.steps} steps ...", flush=True)
            point = run_hand(job, batch=batch, work=folder / "runs", log_path=self.logs / key / f"hand-b{batch}.log",
                             timeout_s=self.timeout(), peak_mib=self.peak)
            points.append(point)
            print(f"    {point.outcome} steps/s {point.steps_per_s} images/s {point.images_per_s} first step "
                  f"{point.first_step_s} wall {point.wall_s:.1f} s peak {point.peak_mib} {point.note}", flush=True)
            out["runs"] = [asdict(p) for p in points]
            self.save()
            shutil.rmtree(folder / "runs", ignore_errors=True)  # SDXL LoRAs are large; only the numbers matter
            reason = sweep_stop_reason(points, stop_when_slower=not args.full_sweep)
            if reason:
                out["stopped"] = reason
                break
        out["runs"] = [asdict(p) for p in points]
        best = best_point(points)
        out["best"] = asdict(best) if best else None
        return out

    def start(self) -> None:
        self.report["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.report["budget_s"] = self.args.budget_s
        self.report["gpu"] = gpu_facts() if not self.args.cpu_smoke else {"nvidia_smi": False, "note": "CPU smoke"}
        self.report["memory_note"] = "peak GPU memory is nvidia-smi memory.used of GPU 0: device-wide"
        self.sampler.start()
        self.report["idle_mib"] = None
        if self.sampler.enabled:
            time.sleep(1.0)
            self.report["idle_mib"] = self.sampler.samples[0][1] if self.sampler.samples else None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the budget counts the CUDA probe too: gpu_fit.sh's backstop does
    args = parse_args(argv)
    problems = check_prerequisites(args)
    if problems:
        print("gpu_fit: cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    torch_facts: dict[str, Any] | None = None
    if not args.cpu_smoke:
        try:
            torch_facts = probe_cuda(args.kohya_python)
        except Missing as exc:
            print(f"gpu_fit: cannot run: {exc}", file=sys.stderr)
            return 2
        if not torch_facts.get("cuda"):
            print(f"gpu_fit: cannot run: kohya's python (torch {torch_facts.get('torch')}) sees no CUDA GPU; "
                  "run it on a GPU machine, or prove the script with --cpu-smoke", file=sys.stderr)
            return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-fit-"))
    run = Run(args, work, started)
    # `timeout` (gpu_fit.sh's backstop) sends SIGTERM: unwind, so the finally blocks stop the trainers and the
    # daemon and the report is saved.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run.report["kohya_torch"] = torch_facts
    run.start()
    t0 = time.monotonic()
    try:
        keys = [args.only] if args.only else ["sd15", "sdxl"]
        for key in keys:
            model = args.sd15_model if key == "sd15" else args.sdxl_model
            if model:
                run.bench_model(key, model)
    finally:
        run.sampler.stop()
        run.report["wall_s"] = round(time.monotonic() - t0, 1)
        run.save()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = table(run.report)
    mode = "CPU SMOKE: proves the script runs; its speed means nothing" if args.cpu_smoke else \
        f"GPU: {run.report['gpu'].get('name')} ({run.report['gpu'].get('memory_total_mib')} MiB)"
    print(f"\n{mode}; wall {run.report['wall_s']} s\n{text}\n\nreport: {run.out}")
    return 0
