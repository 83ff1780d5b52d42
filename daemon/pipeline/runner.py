"""One job through the pipeline: prepping → training → copying → done (or error / cancelled).

Every state change, progress update, log batch and checkpoint goes through the JobReporter, which
saves it in SQLite and then publishes it, so what a client sees is what a restart finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from daemon.config import Config
from daemon.errors import DaemonError
from daemon.events import EventType
from daemon.hub import EventHub
from daemon.jobs.models import Job, JobError, JobState, Progress, Recovery, interrupted_error
from daemon.jobs.store import LOG_RING, JobStore
from daemon.pipeline import (
    buckets,
    captions,
    checkpoints,
    dataset,
    faces,
    kohya,
    loss_history,
    oom_retry,
    publish,
    train_state,
)
from daemon.pipeline.env_check import GpuInfo, check_script, check_workspace, prepare_tokenizers
from daemon.pipeline.failure import classify_failure
from daemon.pipeline.fast_start import FastStart
from daemon.pipeline.model_arch import ARCH_LABELS, TRAINABLE_ARCHS, detect_arch
from daemon.pipeline.params import TrainParams, total_steps
from daemon.pipeline.process import OutputChunk, TrainerProcess
from daemon.pipeline.progress import (
    CheckpointSaved,
    EpochStarted,
    ModelSaved,
    OutputParser,
    Parsed,
    PrepProgress,
    ProgressEvent,
    SampleImagesStarted,
    StepProgress,
    TotalSteps,
    prep_phase,
)
from daemon.pipeline.samples import SampleWatcher
from daemon.pipeline.standby import Standby
from daemon.pipeline.train_state import SavedState

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25
OUTPUT_DRAIN_S = 5.0  # after the trainer exits, how long what it started may keep its output open
# ...and once that is stopped, the reader is given up on only after this long without a byte of progress:
# a backlog (a chatty trainer's last megabytes) is always read to the end.
OUTPUT_STALL_S = 10.0
DESCENDANT_SCAN_TICKS = 13  # ~2 s
STATE_SCAN_TICKS = 13  # how often the saved training states are looked at while kohya runs (~2 s)
RESUME_KINDS = ("resumed", "auto_resumed")
# Failures before kohya could go on, whose cause is outside the job and can be put right: a job with a saved state
# keeps it (see JobRunner._fail). Not no_data (its pictures are gone for good) nor anything kohya said.
FIXABLE_AROUND_THE_RUN = frozenset({"setup", "model_not_found", "tokenizer_missing", "no_gpu"})
LOG_FLUSH_INTERVAL_S = 0.3
# What one log batch (saved in the job's ring, sent on the WebSocket) may hold; a chatty trainer's
# surplus is counted and named in the batch instead. trainer.log keeps every line.
LOG_BATCH_LINES = LOG_RING - 1  # + the note on what was left out: a batch fits the ring
LOG_BATCH_CHARS = 512 * 1024
MAX_LOG_LINE_CHARS = 4000


class JobFailed(Exception):
    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class JobPaths:
    root: Path

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def images(self) -> Path:
        return self.root / "dataset" / "img"

    @property
    def dataset_config(self) -> Path:
        return self.root / "dataset" / "dataset.toml"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def trainer_log(self) -> Path:
        return self.root / "trainer.log"

    @property
    def sample_prompts(self) -> Path:
        return self.root / "sample_prompts.txt"

    @property
    def samples(self) -> Path:
        return self.output / "sample"  # where kohya writes preview pictures


def training_plan(params: TrainParams, script: str, *, cpu: bool) -> str:
    """One line saying which script runs and how the run fits the card (the levers fit.py chose)."""
    levers = [
        f"tier {params.memory_tier}",
        f"batch {params.batch_size}",
        "fp32" if params.mixed_precision == "no" else params.mixed_precision,
        "gradient checkpointing" if params.gradient_checkpointing else "no gradient checkpointing",
    ]
    if params.arch == "sdxl":
        levers.append("text encoders cached" if params.cache_text_encoder_outputs else "text encoders not cached")
    levers.append("fp8 base" if params.fp8_base else "no fp8")
    device = "CPU" if cpu else "GPU"
    label = ARCH_LABELS.get(params.arch, params.arch)
    return f"training {label} with {script} on the {device}: {', '.join(levers)}"


def job_paths(config: Config, job_id: str) -> JobPaths:
    return JobPaths(config.jobs_dir / job_id)


def output_name(job: Job) -> str:
    return publish.slugify(job.name)


def preview_phase(phase: str, event: ProgressEvent, preview_step: int | None) -> str:
    """The job's phase after `event`. kohya prints a line when it starts the previews but none when they
    end: what follows them (the next epoch, a checkpoint, the final save or a later step) ends them."""
    if isinstance(event, SampleImagesStarted):
        return "preview"
    if phase != "preview":
        return phase
    if isinstance(event, (EpochStarted, CheckpointSaved, ModelSaved)):
        return "training"
    # the bar kohya redraws right after a preview at step N still says N; only a new step ends it
    if isinstance(event, StepProgress) and (preview_step is None or event.step > preview_step):
        return "training"
    return phase


class JobReporter:
    """The single way a running job tells the world anything: each change is saved and published as
    one step (EventHub.publish), so a client never sees it twice or misses it."""

    def __init__(self, job: Job, store: JobStore, hub: EventHub) -> None:
        self.job = job
        self._store = store
        self._hub = hub
        self._last_progress = 0.0
        self._progress_dirty = False
        self._progress_timer: asyncio.TimerHandle | None = None
        self._progress_sends: set[asyncio.Task[None]] = set()
        self._pending_logs: deque[str] = deque()
        self._pending_chars = 0
        self._skipped_logs = 0
        self._last_log_flush = 0.0
        self.preview_step: int | None = None  # the step kohya's current preview was started at
        # epochs done before this kohya launch when it resumed from a saved state: its bar restarts at 0
        self.resumed_epochs: int | None = None
        self._loss = loss_history.LossBuffer()
        self._last_loss_flush = 0.0

    def saver(self) -> Callable[[], None]:
        # A copy: the store writes in a worker thread while this job keeps changing on the loop.
        job = replace(self.job, progress=replace(self.job.progress), samples=list(self.job.samples),
                      recovery=Recovery.from_json(copy.deepcopy(self.job.recovery.to_json())))
        return partial(self._store.save, job)

    async def state(self, state: JobState) -> None:
        self.job.state = state
        await self._hub.emit(EventType.STATE, self.job.id, self.job.state_data(), persist=self.saver())

    async def progress(self, progress: Progress, *, force: bool = False) -> None:
        self.job.progress = progress
        now = time.monotonic()
        wait = self._last_progress + PROGRESS_INTERVAL_S - now
        if not force and wait > 0:
            # Held back, and sent when the interval is up even if the trainer prints nothing more:
            # the newest state is never more than one interval late.
            self._progress_dirty = True
            if self._progress_timer is None:
                self._progress_timer = asyncio.get_running_loop().call_later(wait, self._progress_due)
            return
        self._last_progress = now
        self._progress_dirty = False
        await self._hub.emit(EventType.PROGRESS, self.job.id, progress.to_json(), persist=self.saver())

    def _progress_due(self) -> None:
        self._progress_timer = None
        if self._progress_dirty:
            task = asyncio.create_task(self.progress(self.job.progress, force=True))
            self._progress_sends.add(task)
            task.add_done_callback(self._progress_sent)

    def _progress_sent(self, task: asyncio.Task[None]) -> None:
        self._progress_sends.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("job %s: a progress update was not saved: %s", self.job.id, error)

    async def stop_timers(self) -> None:
        """No held-back progress is sent after this (the caller sends the final state itself)."""
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        await asyncio.gather(*self._progress_sends, return_exceptions=True)

    async def log_lines(self, lines: list[str], *, force: bool = False) -> None:
        for line in lines:
            self._hold_log(line)
        now = time.monotonic()
        if not self._pending_logs or (not force and now - self._last_log_flush < LOG_FLUSH_INTERVAL_S):
            return
        batch = list(self._pending_logs)
        if self._skipped_logs:
            batch.insert(0, f"[{self._skipped_logs} more lines of trainer output here are in trainer.log]")
        self._pending_logs.clear()
        self._pending_chars = self._skipped_logs = 0
        self._last_log_flush = now
        await self._hub.emit(EventType.LOG, self.job.id, {"lines": batch},
                             persist=partial(self._store.append_logs, self.job.id, batch))

    def _hold_log(self, line: str) -> None:
        if len(line) > MAX_LOG_LINE_CHARS:
            line = line[:MAX_LOG_LINE_CHARS] + " [cut; trainer.log has the whole line]"
        self._pending_logs.append(line)
        self._pending_chars += len(line)
        while len(self._pending_logs) > LOG_BATCH_LINES or self._pending_chars > LOG_BATCH_CHARS:
            self._pending_chars -= len(self._pending_logs.popleft())
            self._skipped_logs += 1

    async def tick(self) -> None:
        """Send the log lines and loss points the throttle held back; called periodically while the trainer runs
        (held-back progress has its own timer, see progress())."""
        if self._pending_logs and time.monotonic() - self._last_log_flush >= LOG_FLUSH_INTERVAL_S:
            await self.log_lines([], force=True)
        if time.monotonic() - self._last_loss_flush >= loss_history.FLUSH_INTERVAL_S:
            await self.flush_loss()

    def loss_point(self, step: int, epoch: int, loss: float | None) -> None:
        self._loss.add(step, epoch, loss)

    async def flush_loss(self, *, final: bool = False) -> None:
        """The finished steps' points as one `loss` event, stored in one transaction; `final`: the launch's
        output ended, so its last step is finished too."""
        self._last_loss_flush = time.monotonic()
        points = self._loss.take(final=final)
        if points:
            await self._hub.emit(EventType.LOSS, self.job.id, {"points": loss_history.to_json(points)},
                                 persist=partial(self._store.add_loss, self.job.id, points))

    async def restart_loss(self, after_epoch: int) -> None:
        """A launch trains again from after `after_epoch` (0: the first step): the later epochs' points and
        published records go; the frame tells the tab to drop the same points."""
        self._loss.take(final=True)  # a previous attempt's last point: the new launch redraws its step
        await self._hub.emit(EventType.LOSS, self.job.id, {"points": [], "cleared_after_epoch": after_epoch},
                             persist=partial(self._store.forget_after, self.job.id, after_epoch))

    async def sample(self, path: Path) -> None:
        if path.name in self.job.samples:  # a resumed job's folder still holds the previews of its earlier runs
            return
        self.job.samples.append(path.name)
        await self._hub.emit(EventType.SAMPLE, self.job.id, {"file": path.name, "url": self.job.sample_url(path.name)},
                             persist=self.saver())

    async def notice(self, kind: str, message: str) -> None:
        """A recovery action, said once: kept in the job (recovery.notices, log) and sent as a NOTICE event."""
        self.job.recovery.notices.append(message)
        await self.log_lines([message], force=True)
        await self._hub.emit(EventType.NOTICE, self.job.id,
                             {"kind": kind, "message": message, "recovery": self.job.recovery.to_json()},
                             persist=self.saver())

    async def recovery_changed(self) -> None:
        """Saved-state bookkeeping changed (a state appeared or was removed): stored with the job."""
        await asyncio.to_thread(self.saver())

    async def checkpoint(self, path: str) -> None:
        """kohya says it is saving `path` (the file is written after this): the tab lists it once complete."""
        name = Path(path).name
        epoch = checkpoints.epoch_of(name, output_name(self.job))
        await self._hub.emit(EventType.CHECKPOINT, self.job.id, {"file": name, "epoch": epoch})

    async def finish(self, state: JobState, *, error: JobError | None = None) -> None:
        await self.stop_timers()
        await self.log_lines([], force=True)
        await self.progress(self.job.progress, force=True)
        self.job.error = error
        await self.state(state)
        await self._hub.emit(EventType.RESULT, self.job.id, self.job.state_data())


GpuProvider = Callable[[], Awaitable[GpuInfo]]


class JobRunner:
    def __init__(self, config: Config, store: JobStore, hub: EventHub, gpu: GpuProvider,
                 standby: Standby | None = None) -> None:
        self._config = config
        self._store = store
        self._hub = hub
        self._gpu = gpu
        self._fast = FastStart(config, store, standby=standby)

    async def run(self, job: Job, cancel: asyncio.Event, *, resumed: str | None = None) -> None:
        """`resumed`: "resumed" (by hand) or "auto_resumed" (at start-up) when the job was queued again after
        it was interrupted; it then continues from its saved state, or trains again from the first step."""
        reporter = JobReporter(job, self._store, self._hub)
        paths = job_paths(self._config, job.id)
        copying: asyncio.Future[Path] | None = None
        if resumed is None and job.recovery.resume_next:
            resumed = "resumed"  # queued again by hand, then the daemon restarted before it ran
        try:
            if cancel.is_set():  # cancelled between the queue handing it over and now
                await self._finish(reporter, JobState.CANCELLED)
                return
            params = TrainParams.from_json(job.params)
            resume = await self._resume_point(job, params, reporter, resumed)
            await reporter.state(JobState.PREPPING)
            cpu = await self._device(job)
            await self._fast.prepare(partial(self._prep, job, params, paths, cpu, resume, reporter, cancel),
                                     job_id=job.id, base_model=job.base_model, arch=params.arch, job_root=paths.root,
                                     images=paths.images, cpu=cpu, cancel=cancel)
            if cancel.is_set():
                await self._finish(reporter, JobState.CANCELLED)
                return
            await reporter.state(JobState.TRAINING)
            tried: list[TrainParams] = []  # the settings of each attempt that ran out of GPU memory
            # ...and the retries of its runs before this one (the daemon died meanwhile): oom_retries is per job
            earlier = list(job.recovery.retries)
            while True:
                try:
                    result = await self._train(job, params, paths, cpu, reporter, cancel, resume=resume)
                    break
                except JobFailed as failed:
                    # raises `failed`, or the final out-of-memory error, when there is nothing to retry
                    params, resume = await self._retry_after_oom(job, params, failed, tried, earlier, paths, cpu,
                                                                  reporter)
                if cancel.is_set():
                    await self._finish(reporter, JobState.CANCELLED)
                    return
            if cancel.is_set():
                await self._finish(reporter, JobState.CANCELLED)
                return
            await reporter.state(JobState.COPYING)
            # A thread cannot be stopped: on shutdown the copy still finishes, and is recorded (below).
            copying = asyncio.ensure_future(asyncio.to_thread(self._publish, job, result, params.arch))
            self._record_artifact(job, await asyncio.shield(copying))
            # Saved at once: whatever fails from here on (a full disk while finishing), the store knows the
            # LoRA reached ED's folder, so the job is never recorded as failed.
            await asyncio.to_thread(reporter.saver())
            await reporter.log_lines([f"LoRA published: {job.artifact}"], force=True)
            await self._finish(reporter, JobState.DONE)
        except JobFailed as exc:
            await self._fail(reporter, exc.error)
        except DaemonError as exc:
            await self._fail(reporter, JobError("setup", exc.message, exc.hint or ""))
        except asyncio.CancelledError:
            await reporter.stop_timers()
            # stopped between prep and the go (the daemon shutting down): the prestarted trainer and its guard go
            # now, not with the event loop
            await self._fast.discard(job.id)
            await self._interrupted(job, copying)
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            if job.artifact is not None:  # published: the user has the LoRA, whatever failed afterwards
                await self._finish(reporter, JobState.DONE)
                return
            await self._finish(reporter, JobState.ERROR, error=JobError(
                "internal", f"The daemon hit an unexpected error: {type(exc).__name__}: {exc}",
                "See the daemon's console output; please report this."))

    async def _retry_after_oom(self, job: Job, params: TrainParams, failed: JobFailed, tried: list[TrainParams],
                               earlier: list[dict[str, Any]], paths: JobPaths, cpu: bool,
                               reporter: JobReporter) -> tuple[TrainParams, SavedState | None]:
        """The next attempt after kohya ran out of GPU memory: its settings one memory tier lower
        (daemon/pipeline/oom_retry.py), stored with the job, announced (a notice event and a log line) and in
        the dataset config, and the saved state it continues from (None: from the first step). Raises `failed`
        when it was not GPU memory or retries are off, and the final out_of_memory error, naming what was
        tried, when the retries are used up or nothing lower is left."""
        if not oom_retry.gpu_out_of_memory(failed.error.kind, job_tail(paths.trainer_log), cpu=cpu):
            raise failed
        limit = self._config.oom_retries
        if limit == 0:
            raise failed
        tried.append(params)
        attempt = len(earlier) + len(tried)
        gpu = await self._gpu()
        state = await asyncio.to_thread(train_state.find_resume_state, paths.output, output_name(job))
        plan = None
        if attempt <= limit:
            plan = oom_retry.plan_retry(params, gpu, attempt=attempt, limit=limit,
                                        state_epoch=state.epoch if state is not None else None)
        if plan is None:
            message, hint = oom_retry.final_error(tried, gpu, limit=limit, earlier=earlier)
            raise JobFailed(JobError(failed.error.kind, message, hint)) from failed
        job.params = plan.params.to_json()  # a new dict: a saver's copy of the job may still hold the old one
        job.recovery.retries.append({
            "attempt": attempt, "from_tier": plan.from_tier, "to_tier": plan.to_tier,
            "from_batch": params.batch_size, "to_batch": plan.params.batch_size, "at_step": job.progress.step,
            "message": plan.message,
        })
        log.warning("job %s: %s", job.id, plan.message)
        # batch_size lives in the dataset config; the pictures stay (a retry never changes the resolution)
        config = kohya.dataset_config(image_dir=str(paths.images), class_tokens=job.class_token, params=plan.params)
        await asyncio.to_thread(kohya.write_dataset_config, paths.dataset_config, config)
        await reporter.log_lines([f"trainer exited: {failed.error.message}"], force=True)
        await reporter.notice("oom_retry", plan.message)
        # the failed attempt's bar was for the old batch: the next one counts from the start, or on from the
        # state's epoch (_train works out its step offset once kohya prints the new total)
        job.progress = Progress(epoch=state.epoch if state is not None else 0, epochs=plan.params.epochs)
        return plan.params, state

    async def _resume_point(self, job: Job, params: TrainParams, reporter: JobReporter,
                            resumed: str | None) -> SavedState | None:
        """For a resumed job: its newest complete saved state (None: it trains again from the first step), and
        the NOTICE saying which. A job's first run has none."""
        if resumed is None:
            return None
        paths = job_paths(self._config, job.id)
        state = await asyncio.to_thread(train_state.find_resume_state, paths.output, output_name(job))
        rec = job.recovery
        rec.resume_next = False
        rec.resumes += 1
        if resumed == "auto_resumed":
            rec.auto_resumes += 1
        rec.state_epoch = state.epoch if state is not None else None
        if state is None:
            rec.step_offset = 0
            message = "There was no saved state to continue from: training again from the first step."
        else:
            total = job.progress.total
            rec.step_offset = train_state.step_offset(state.epoch, total, params.epochs) if total else 0
            when = "automatically after the daemon restarted, " if resumed == "auto_resumed" else ""
            message = f"Resumed {when}from the state saved after epoch {state.epoch} of {params.epochs}."
        # the bar starts where the saved state is, not where the interrupted run got to
        job.progress = Progress(step=rec.step_offset, total=job.progress.total, epoch=state.epoch if state else 0,
                                epochs=params.epochs)
        await reporter.notice(resumed if resumed in RESUME_KINDS else "resumed", message)
        return state

    async def _fail(self, reporter: JobReporter, error: JobError) -> None:
        """The job failed. When it failed on something around the run that the user can put right (the base model's
        drive not mounted, kohya's venv moved, no GPU) and it has a saved training state, that state is worth hours:
        the job stays interrupted with the reason, keeps the state, and Resume (or the next start-up's automatic
        resume) continues from it once the cause is fixed. Every other failure ends the job, states removed."""
        job = reporter.job
        if error.kind in FIXABLE_AROUND_THE_RUN:
            rec = job.recovery
            # (when there is no state, _finish below sets the record again as the job ends)
            state = await asyncio.to_thread(train_state.record_states, rec, job_paths(self._config, job.id).output,
                                            output_name(job))
            if state is not None:
                rec.resume_next = False
                rec.auto_resumes = 0  # not the job taking the daemon down: the cap on automatic resumes is for that
                kept = f"the training saved after epoch {state.epoch} is kept."
                hint = (f"Put the base model back at {job.base_model} (or reconnect its drive), then press Resume: "
                        f"{kept}" if error.kind == "model_not_found"
                        else f"{error.hint} Then press Resume: {kept}".strip())
                log.warning("job %s: %s; its saved state (epoch %d) is kept for a resume", job.id, error.message,
                            state.epoch)
                # a notice, so that the job's list of what happened reads on from "Resumed ..." to why it stopped
                await reporter.notice("state_kept", f"Stopped before training: {error.message} The state saved after "
                                                    f"epoch {state.epoch} is kept for Resume.")
                await reporter.finish(JobState.INTERRUPTED, error=JobError(error.kind, error.message, hint))
                return
        await self._finish(reporter, JobState.ERROR, error=error)

    async def _finish(self, reporter: JobReporter, state: JobState, *, error: JobError | None = None) -> None:
        """The job's end; a finished job cannot be resumed, so its saved training states go (they are ~3x the
        LoRA's size each)."""
        job = reporter.job
        paths = job_paths(self._config, job.id)
        try:
            await asyncio.to_thread(train_state.remove_states, paths.output, output_name(job))
        except OSError as exc:
            log.warning("job %s: could not remove its training states: %s", job.id, exc)
        rec = job.recovery
        rec.state_epoch, rec.resume_next = None, False
        rec.state_bytes = await asyncio.to_thread(train_state.states_bytes, paths.output, output_name(job))
        await reporter.finish(state, error=error)

    async def _scan_states(self, reporter: JobReporter, paths: JobPaths) -> None:
        """recovery.state_epoch / state_bytes as kohya saves (and prunes) its states."""
        job = reporter.job
        # scanned into a scratch record in the worker thread; the job's own is changed only here, on the loop
        now = Recovery()
        await asyncio.to_thread(train_state.record_states, now, paths.output, output_name(job))
        rec = job.recovery
        if (now.state_epoch, now.state_bytes) != (rec.state_epoch, rec.state_bytes):
            rec.state_epoch, rec.state_bytes = now.state_epoch, now.state_bytes
            await reporter.recovery_changed()

    def _record_artifact(self, job: Job, final: Path) -> None:
        job.artifact = str(final)
        job.lora_id = publish.lora_id(final, self._config.ed_lora_dir)

    async def _interrupted(self, job: Job, copying: asyncio.Future[Path] | None) -> None:
        """The daemon is shutting down (the queue already killed the trainer): record how far the job got."""
        if copying is not None:
            try:
                self._record_artifact(job, await copying)
                job.state, job.error = JobState.DONE, None
            except Exception as exc:  # the copy itself failed; say so rather than 'interrupted'
                job.state = JobState.ERROR
                job.error = JobError("publish_failed", str(exc), "Start the job again.")
        else:
            job.state, job.error = JobState.INTERRUPTED, interrupted_error()
            # A clean stop (ED closed, POST /shutdown) is not the job taking the daemon down: the cap on automatic
            # resumes counts only the crashes in a row.
            job.recovery.auto_resumes = 0
            # kept: the saved state is what the job resumes from
            await asyncio.to_thread(train_state.record_states, job.recovery, job_paths(self._config, job.id).output,
                                    output_name(job))
        await asyncio.to_thread(self._store.save, job)

    async def _device(self, job: Job) -> bool:
        """True when training runs on the CPU. Fails the job when there is no GPU and CPU is not allowed."""
        gpu = await self._gpu()
        if gpu.cuda:
            return False
        if self._config.allow_cpu:
            return True
        raise JobFailed(JobError(
            "no_gpu", f"No CUDA GPU was found ({gpu.error or 'torch sees no CUDA device'}).",
            "Install a CUDA build of torch in the kohya venv, or set allow_cpu: true in the daemon config."))

    async def _prep(self, job: Job, params: TrainParams, paths: JobPaths, cpu: bool, resume: SavedState | None,
                    reporter: JobReporter, cancel: asyncio.Event) -> None:
        crops = None
        if params.face_crop:  # never fails the job: without a detector the pictures are used whole
            uploads = await asyncio.to_thread(stored_uploads, paths)
            crops, lines = await faces.job_crops(self._config, uploads, paths.root / "faces",
                                                 resolution=params.resolution, cancel=cancel)
            for line in lines:
                log.info("job %s: %s", job.id, line)
            await reporter.log_lines(lines, force=True)
        await asyncio.to_thread(self._prepare, job, params, paths, cpu, resume, crops)

    def _prepare(self, job: Job, params: TrainParams, paths: JobPaths, cpu: bool,
                 resume: SavedState | None = None, crops: list[faces.Crop | None] | None = None) -> None:
        for check in (check_script(self._config), check_workspace(self._config)):
            if not check.ok:
                raise JobFailed(JobError("setup", f"kohya is not set up: {check.detail}.", check.fix))
        if not Path(job.base_model).exists():
            raise JobFailed(JobError("model_not_found", f"The base model {job.base_model} no longer exists.",
                                     "Pick another base model and start again."))
        self._check_family(job, params)
        uploads = stored_uploads(paths)
        # Cleaned again: the stored file is the user's; the same texts on every start, resume and retry.
        own = captions.clean_all(captions.read_captions(paths.uploads, [u.path.name for u in uploads]), job.trigger)
        if paths.images.exists():
            shutil.rmtree(paths.images)
        try:
            prepared = dataset.prepare_images(uploads, paths.images, size=params.resolution,
                                              text=dataset.caption(job.trigger, job.class_token), captions=own,
                                              crops=crops)
        except dataset.ImageProblem as exc:
            raise JobFailed(JobError("bad_image", exc.message, exc.hint or "")) from exc
        counts = buckets.bucket_counts((p.size for p in prepared), params.resolution)
        log.info("job %s: %d pictures in %d bucket(s) %s, about %d steps", job.id, len(prepared), len(counts),
                 dict(sorted(counts.items())), total_steps(params, counts.values()))
        config = kohya.dataset_config(image_dir=str(paths.images), class_tokens=job.class_token, params=params)
        kohya.write_dataset_config(paths.dataset_config, config)
        if params.sample_every_n_epochs > 0:
            paths.sample_prompts.write_text(
                kohya.sample_prompt_file(trigger=job.trigger, class_token=job.class_token, params=params, cpu=cpu),
                encoding="utf-8",
            )
        if resume is not None:
            # kohya continues in the same folder: the epoch files and the state are what it continues from
            train_state.remove_incomplete(paths.output, output_name(job))
        else:
            # from the first step; a job trained again after an interruption keeps its earlier previews
            train_state.clear_output(paths.output, keep=(paths.samples.name,))
        paths.logs.mkdir(parents=True, exist_ok=True)

    def _check_family(self, job: Job, params: TrainParams) -> None:
        """What must hold before this family's script may start; each failure is a sentence and a fix, found
        before kohya spends seconds to minutes of start-up on it."""
        assert self._config.kohya.script_path is not None  # checked just before
        label = ARCH_LABELS.get(params.arch, params.arch)
        found = detect_arch(Path(job.base_model))
        if found in TRAINABLE_ARCHS and found != params.arch:
            # The wrong script would fail only at the model load, with 88-133 KB of state_dict keys.
            raise JobFailed(JobError(
                "model_incompatible",
                f"{Path(job.base_model).name} is an {ARCH_LABELS[found]} model, but the job was set up for {label}.",
                "Start the job again: the settings follow the base model you pick."))
        script = kohya.script_for(params.arch, self._config.kohya.script_path)
        if not script.is_file():
            raise JobFailed(JobError(
                "setup", f"kohya is not set up for {label}: {script} does not exist.",
                f"Use an sd-scripts folder that has {script.name} beside train_network.py (update sd-scripts, or "
                "point kohya.script_path at a newer checkout)."))
        problem = kohya.lever_problem(params)
        if problem:
            raise JobFailed(JobError("bad_arguments", f"These training settings cannot run: {problem}",
                                     "Choose another memory tier or precision in Advanced and start again."))
        if params.arch == "sdxl":
            check, made = prepare_tokenizers(self._config, params.arch)
            if made is not None:
                log.info("job %s: made SDXL's second tokenizer %s from the CLIP-L files", job.id, made)
            if not check.ok:
                raise JobFailed(JobError("tokenizer_missing", f"SDXL's tokenizers are not ready: {check.detail}.",
                                         check.fix))

    def _launch(self, job: Job, params: TrainParams, paths: JobPaths, cpu: bool,
                resume: SavedState | None = None) -> kohya.KohyaLaunch:
        k = self._config.kohya
        assert k.script_path is not None and k.workspace is not None  # checked in _prepare
        return kohya.KohyaLaunch(
            script_path=str(kohya.script_for(params.arch, k.script_path)),
            workspace=str(k.workspace),
            accelerate_bin=k.accelerate_bin,
            python=str(k.python) if k.python else None,
            base_model=job.base_model,
            dataset_config=str(paths.dataset_config),
            output_dir=str(paths.output),
            output_name=output_name(job),
            logging_dir=str(paths.logs),
            tokenizer_cache_dir=str(k.tokenizer_cache_dir) if k.tokenizer_cache_dir else None,
            extra_args=tuple(k.extra_args),
            cpu=cpu,
            trigger=job.trigger,
            job_id=job.id,
            sample_prompts=str(paths.sample_prompts) if paths.sample_prompts.is_file() else None,
            resume_state=str(resume.path) if resume is not None else None,
            initial_epoch=resume.epoch + 1 if resume is not None else None,
        )

    async def _train(self, job: Job, params: TrainParams, paths: JobPaths, cpu: bool,
                     reporter: JobReporter, cancel: asyncio.Event, resume: SavedState | None = None) -> Path:
        """`resume`: continue from this saved state (--resume, --initial_epoch); progress counts on from it."""
        launch = self._launch(job, params, paths, cpu, resume)
        argv = self._fast.argv(kohya.build_command(params, launch), memory_tier=params.memory_tier,
                               resolution=params.resolution, cpu=cpu)
        env = kohya.build_env(os.environ, tokenizer_cache_dir=launch.tokenizer_cache_dir, cpu=cpu)
        plan = training_plan(params, Path(launch.script_path).name, cpu=cpu)
        log.info("job %s: %s", job.id, plan)
        why = [f"settings: {params.fit_reason}"] if params.fit_reason else []
        await reporter.log_lines([plan, *why, f"$ {' '.join(argv)}"], force=True)
        samples = SampleWatcher(paths.samples, reporter.sample)
        parser = OutputParser()
        meter = _OutputMeter()
        progress = Progress(epochs=params.epochs)
        reporter.resumed_epochs = resume.epoch if resume is not None else None
        if resume is None:
            job.recovery.step_offset = 0
        else:
            progress = replace(job.progress)
        await reporter.restart_loss(resume.epoch if resume is not None else 0)
        proc: TrainerProcess | None = None
        watcher = ticker = reader = None
        stop_ticking = asyncio.Event()
        try:
            await samples.start()  # before the trainer, so not even its first picture is missed
            try:
                proc = await self._fast.start(argv, cwd=launch.workspace, env=env, job_id=job.id)
            except OSError as exc:
                raise JobFailed(JobError("setup", f"The trainer could not be started: {exc}",
                                         "Check kohya.python / kohya.accelerate_bin in the daemon config.")) from exc
            # Recorded so a restart after a daemon crash can kill a trainer left running.
            await asyncio.to_thread(self._store.set_process, job.id, proc.pid, proc.started)
            watcher = asyncio.create_task(self._kill_on_cancel(proc, cancel))
            ticker = asyncio.create_task(self._tick(reporter, proc, stop_ticking, paths))
            reader = asyncio.create_task(self._read_output(proc, paths, parser, progress, reporter, meter))
            exit_code = await proc.wait()
            if not await _finished_within(reader, OUTPUT_DRAIN_S):
                # kohya has exited but its output is still open: stop what it started (what they wrote
                # stays readable), so nothing can add to the backlog while it is read to the end.
                await proc.terminate_tree()
            if not await _drained(reader, meter, OUTPUT_STALL_S):
                reader.cancel()  # no progress at all: a process outside the tree holds the pipes
            await asyncio.gather(reader, return_exceptions=True)
            if not reader.cancelled() and (error := reader.exception()) is not None:
                raise error
        finally:
            stop_ticking.set()  # the ticker ends after its current flush, never cut in half
            for task in (watcher, reader):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (watcher, ticker, reader) if t is not None), return_exceptions=True)
            try:
                if proc is not None:
                    await proc.terminate_tree()  # never leave the trainer, or anything it started, behind
            finally:
                await samples.stop()
                await asyncio.to_thread(self._store.set_process, job.id, None, None)
        await reporter.flush_loss(final=True)
        await reporter.progress(progress, force=True)
        await self._scan_states(reporter, paths)
        final = paths.output / f"{output_name(job)}.safetensors"
        tracker = parser.tracker
        failure = classify_failure(
            exit_code=exit_code,
            cancelled=cancel.is_set(),
            model_saved=tracker.model_saved,
            output_exists=final.is_file(),
            errors=tracker.errors,
            tail=job_tail(paths.trainer_log),
            arch=params.arch,
            on_gpu=not cpu,
        )
        if cancel.is_set():
            return final
        if failure is not None:
            await reporter.log_lines([f"trainer exited with code {exit_code}"], force=True)
            raise JobFailed(JobError(failure.kind, failure.message, failure.hint))
        return final

    async def _consume(self, parsed: Parsed, progress: Progress, reporter: JobReporter) -> None:
        if parsed.log_lines:
            await reporter.log_lines(parsed.log_lines)
        await self._apply(parsed.events, progress, reporter)

    @staticmethod
    async def _apply(events: list[ProgressEvent], progress: Progress, reporter: JobReporter) -> None:
        changed = False
        phase = progress.phase
        for event in events:
            progress.phase = preview_phase(prep_phase(progress.phase, event), event, reporter.preview_step)
            if isinstance(event, SampleImagesStarted):
                reporter.preview_step = event.step if event.step is not None else progress.step
            if isinstance(event, PrepProgress):
                progress.prep_done, progress.prep_total = event.done, event.total
                changed = True
            elif isinstance(event, TotalSteps):
                progress.total = event.total
                _offset_steps(reporter, progress)
                changed = True
            elif isinstance(event, EpochStarted):
                progress.epoch, progress.epochs = event.epoch, event.epochs
                changed = True
            elif isinstance(event, StepProgress):
                progress.total = event.total
                offset = _offset_steps(reporter, progress)
                progress.step = offset + event.step
                # tqdm's rate already leaves the previews out: sd-scripts calls progress_bar.unpause()
                # after sample_images, which takes the pause out of the bar's elapsed time (see
                # test_progress::test_real_rate_leaves_the_preview_time_out).
                progress.rate, progress.eta_s = event.rate, event.eta_s
                if offset and event.rate:
                    # a resumed bar's total counts the steps done before it too
                    progress.eta_s = max(0, event.total - progress.step) / event.rate
                if event.loss is not None and math.isfinite(event.loss):
                    progress.loss = event.loss
                reporter.loss_point(progress.step, progress.epoch, event.loss)
                changed = True
            elif isinstance(event, CheckpointSaved):
                await reporter.checkpoint(event.path)
        if progress.phase != phase:
            # rare (twice per preview) and what the user waits on: never held back by the interval
            await reporter.progress(progress, force=True)
        elif changed:
            await reporter.progress(progress)

    async def _read_output(self, proc: TrainerProcess, paths: JobPaths, parser: OutputParser,
                           progress: Progress, reporter: JobReporter, meter: _OutputMeter) -> None:
        """Every chunk is logged and parsed in a worker thread, so a trainer printing megabytes never
        stalls the event loop; chunks are taken one at a time, so the pipes (and the trainer) wait
        for the parser instead of the output piling up in memory."""
        with paths.trainer_log.open("a", encoding="utf-8") as raw_log:
            async for chunk in proc.output():
                parsed = await asyncio.to_thread(_log_and_parse, raw_log, parser, chunk)
                meter.chars += len(chunk.text)
                await self._consume(parsed, progress, reporter)
            await self._consume(await asyncio.to_thread(parser.finish), progress, reporter)

    async def _tick(self, reporter: JobReporter, proc: TrainerProcess, stop: asyncio.Event, paths: JobPaths) -> None:
        ticks = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOG_FLUSH_INTERVAL_S / 2)
            await reporter.tick()
            ticks += 1
            if ticks % STATE_SCAN_TICKS == 0:
                await self._scan_states(reporter, paths)
            if ticks % DESCENDANT_SCAN_TICKS == 0 and await asyncio.to_thread(proc.remember_descendants):
                # saved, so a restart after a crash can stop them even once they left the trainer's session
                await asyncio.to_thread(self._store.set_descendants, reporter.job.id, proc.descendants)

    @staticmethod
    async def _kill_on_cancel(proc: TrainerProcess, cancel: asyncio.Event) -> None:
        await cancel.wait()
        await proc.terminate_tree()

    def _publish(self, job: Job, result: Path, arch: str) -> Path:
        try:
            return publish.publish_verified(result, self._config.ed_lora_dir, output_name(job), expected_arch=arch)
        except publish.PublishError as exc:
            raise JobFailed(JobError("publish_failed", exc.message, exc.hint or "")) from exc


def _offset_steps(reporter: JobReporter, progress: Progress) -> int:
    """recovery.step_offset for a resumed launch, from kohya's own total (its bar restarts at 0)."""
    rec = reporter.job.recovery
    if reporter.resumed_epochs is not None and progress.total and progress.epochs:
        rec.step_offset = train_state.step_offset(reporter.resumed_epochs, progress.total, progress.epochs)
    return rec.step_offset


@dataclass
class _OutputMeter:
    chars: int = 0  # of trainer output read and parsed so far: how the drain after exit sees progress


def _log_and_parse(raw_log: TextIO, parser: OutputParser, chunk: OutputChunk) -> Parsed:
    raw_log.write(chunk.text)
    raw_log.flush()  # GET /logs?offset= pages through trainer.log while the job runs
    return parser.feed(chunk.stream, chunk.text)


async def _finished_within(task: asyncio.Task[None], seconds: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


async def _drained(reader: asyncio.Task[None], meter: _OutputMeter, stall_s: float) -> bool:
    """Wait for the reader for as long as it keeps making progress; False once it made none for `stall_s`."""
    while True:
        seen = meter.chars
        if await _finished_within(reader, stall_s):
            return True
        if meter.chars == seen:
            return False


def stored_uploads(paths: JobPaths) -> list[dataset.Upload]:
    """The job's stored pictures; a sentence when they are gone (a resume or retry after the folder was deleted by
    hand, to free disk), before kohya is started on nothing."""
    try:
        uploads = dataset.read_uploads(paths.uploads)
    except FileNotFoundError:
        uploads, missing = [], "no longer exists"
    else:
        missing = "holds none"
    if not uploads:
        raise JobFailed(JobError("no_data", f"The job's pictures are gone: {paths.uploads} {missing}.",
                                 "Start a new job with the pictures."))
    return uploads


def job_tail(path: Path, lines: int = 40) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()][-lines:]
