"""kohya by hand: sd-scripts run directly with the fastest flags we know, one batch size at a time.

The baseline the automatic tier is measured against. It trains the same job as the daemon did (same
prepared pictures and buckets, resolution, LoRA rank, text encoder trained or not, optimizer) with
bf16 + `--sdpa` + `--cache_latents` and, for SDXL, the text encoders' outputs cached and the U-Net only
(kohya's own recipe for speed: docs/sdxl_train_network.md), no gradient checkpointing (it halves the speed,
shared/reference/kohya.md §9), for a fixed number of steps.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bench.gpu_fit.measure import (
    ERROR,
    OK,
    OOM,
    TIMEOUT,
    StepSample,
    SweepPoint,
    images_per_s,
    steady_rate,
    warmup_steps,
)
from daemon.pipeline import kohya
from daemon.pipeline.params import TrainParams, default_repeats
from daemon.pipeline.progress import ERR_OUT_OF_MEMORY, LineSplitter, ProgressTracker, StepProgress

SCRIPTS = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py"}


@dataclass(frozen=True)
class HandJob:
    """What a hand run trains; everything path-like absolute."""

    arch: str  # "sd1" | "sdxl"
    sd_scripts: str
    python: str
    model: str
    tokenizer_cache: str
    dataset_config: str  # the TOML without batch_size: --train_batch_size sets it per run
    network_dim: int
    network_alpha: float
    unet_lr: float
    text_encoder_lr: float  # 0: U-Net only
    optimizer: str
    steps: int
    cpu: bool  # the smoke mode: fp32 and kohya's own attention (sdpa is ~4x slower on a CPU)


def hand_params(arch: str, auto: Mapping[str, Any] | None, *, resolution: int, images: int,
                optimizer: str | None) -> dict[str, Any]:
    """The job's training amount and shape for the hand runs: the daemon job's own params when it ran,
    else the balanced preset's. SDXL always caches the text encoders, which means training the U-Net only."""
    base = TrainParams.from_json(auto or {"preset": "balanced"})
    te_lr = 0.0 if arch == "sdxl" else base.text_encoder_lr
    return {
        "resolution": int(auto["resolution"]) if auto and "resolution" in auto else resolution,
        "network_dim": base.network_dim, "network_alpha": base.network_alpha, "unet_lr": base.unet_lr,
        "text_encoder_lr": te_lr, "optimizer": optimizer or (base.optimizer if auto else "AdamW"),
        "repeats": base.repeats if auto else default_repeats(images),
    }


def dataset_document(*, image_dir: str, class_tokens: str, arch: str, resolution: int, repeats: int) -> dict[str, Any]:
    """The daemon's own dataset TOML (same buckets, captions), minus batch_size so the CLI can sweep it."""
    params = TrainParams.from_json({"preset": "balanced", "resolution": resolution, "repeats": repeats})
    doc = kohya.dataset_config(image_dir=image_dir, class_tokens=class_tokens, params=params)
    del doc["general"]["batch_size"]
    if arch == "sdxl":
        # kohya refuses caption shuffling with cached text-encoder outputs (the caption is encoded once).
        doc["general"]["shuffle_caption"] = False
    return doc


def hand_argv(job: HandJob, *, batch: int, output_dir: str, output_name: str) -> list[str]:
    """The argv of one hand run (executed directly, never through a shell)."""
    script = os.path.join(job.sd_scripts, SCRIPTS[job.arch])
    args = [
        job.python, "-u", script,
        "--pretrained_model_name_or_path", job.model,
        "--dataset_config", job.dataset_config,
        "--train_batch_size", str(batch),
        "--max_train_steps", str(job.steps),
        "--output_dir", output_dir, f"--output_name={output_name}",
        "--save_model_as", "safetensors", "--save_precision", "fp16",
        "--network_module", "networks.lora",
        "--network_dim", str(job.network_dim), "--network_alpha", repr(float(job.network_alpha)),
        "--learning_rate", repr(job.unet_lr), "--unet_lr", repr(job.unet_lr),
        "--optimizer_type", job.optimizer, "--lr_scheduler", "constant",
        "--seed", "42", "--max_data_loader_n_workers", "0", "--cache_latents",
        "--console_log_simple", "--tokenizer_cache_dir", job.tokenizer_cache,
    ]
    if job.optimizer == "Adafactor":
        args += ["--optimizer_args", "scale_parameter=False", "relative_step=False", "warmup_init=False"]
    if job.text_encoder_lr > 0:
        args += ["--text_encoder_lr", repr(job.text_encoder_lr)]
    else:
        args.append("--network_train_unet_only")
    if job.arch == "sdxl":
        args.append("--cache_text_encoder_outputs")
    args += ["--mixed_precision", "no"] if job.cpu else ["--mixed_precision", "bf16", "--sdpa"]
    return args


@dataclass
class OutputWatch:
    """kohya's merged output, fed as it arrives: the daemon's own parser turns it into steps and errors."""

    samples: list[StepSample] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    _splitter: LineSplitter = field(default_factory=LineSplitter)
    _tracker: ProgressTracker = field(default_factory=ProgressTracker)
    _decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def feed(self, chunk: bytes, t: float) -> None:
        lines = self._splitter.feed(self._decoder.decode(chunk))
        log: list[str] = []
        events = self._tracker.feed_lines(lines, log)
        # tqdm leaves the newest bar unterminated until its next redraw: read it now, not a step later.
        events += self._tracker.peek_bar(self._splitter.pending)
        self.samples += [StepSample(t, e.step) for e in events if isinstance(e, StepProgress)]
        self.tail = (self.tail + log)[-40:]

    def finish(self) -> None:
        log: list[str] = []
        self._tracker.feed_lines(self._splitter.feed(self._decoder.decode(b"", final=True)) + self._splitter.flush(),
                                 log)
        self._tracker.finish()
        self.tail = (self.tail + log)[-40:]

    @property
    def out_of_memory(self) -> bool:
        return any(e.kind == ERR_OUT_OF_MEMORY for e in self._tracker.errors)

    @property
    def error_lines(self) -> list[str]:
        return [e.message for e in self._tracker.errors]

    @property
    def model_saved(self) -> bool:
        return self._tracker.model_saved


def _pump(proc: subprocess.Popen[bytes], log: BinaryIO, watch: OutputWatch, t0: float,
          timeout_s: float | None) -> bool:
    """Read the trainer's output until it closes; True when `timeout_s` ran out first."""
    assert proc.stdout is not None
    with proc.stdout, selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                return True
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return False
            log.write(chunk)
            watch.feed(chunk, time.monotonic() - t0)


def run_hand(job: HandJob, *, batch: int, work: Path, log_path: Path, timeout_s: float | None,
             peak_mib: Callable[[float, float], int | None]) -> SweepPoint:
    """Train `job.steps` steps at `batch`; the process group is killed when `timeout_s` runs out."""
    out_dir = work / f"{job.arch}-b{batch}"
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = hand_argv(job, batch=batch, output_dir=str(out_dir), output_name=f"hand_b{batch}")
    env = kohya.build_env(os.environ, tokenizer_cache_dir=job.tokenizer_cache, cpu=job.cpu)
    watch = OutputWatch()
    with log_path.open("wb") as log:
        log.write(("# " + " ".join(argv) + "\n").encode())
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=job.sd_scripts, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            timed_out = _pump(proc, log, watch, t0, timeout_s)
            if not timed_out:
                # The pipe closes as the process ends; CUDA's teardown may still take a moment.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
        finally:
            # Also on SIGTERM/Ctrl-C of the bench: a trainer left behind would hold the GPU for the next run.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        wall = time.monotonic() - t0
    watch.finish()
    rate = steady_rate(watch.samples, warmup_steps(job.steps))
    first = watch.samples[0].t if watch.samples else None
    peak = peak_mib(t0, t0 + wall)
    if timed_out:
        outcome, note = TIMEOUT, f"killed after {timeout_s:.0f} s (the time budget)"
    elif watch.out_of_memory:
        outcome, note = OOM, next((m for m in watch.error_lines if "memory" in m.lower()), "out of memory")
    elif rc != 0 or not watch.samples or watch.samples[-1].step < job.steps:
        outcome = ERROR
        note = f"exit code {rc}; " + " | ".join((watch.error_lines or watch.tail)[-3:])
    else:
        outcome, note = OK, ""
    return SweepPoint(batch=batch, outcome=outcome, steps_per_s=rate, images_per_s=images_per_s(rate, batch),
                      first_step_s=first, wall_s=wall, peak_mib=peak, note=note[:400])
