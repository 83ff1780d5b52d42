"""After the daemon died (SIGKILL, crash, power cut): stop what it left running, remove its temporary
files, and record how far each running job got — a LoRA that reached ED's folder makes its job done."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from daemon.config import Config
from daemon.jobs.models import Job, JobState, interrupted_error
from daemon.jobs.store import JobStore
from daemon.pipeline import publish, train_state
from daemon.pipeline.leftovers import ProcInfo, TrainerRecord, kill_leftovers
from daemon.pipeline.runner import job_paths, output_name

log = logging.getLogger(__name__)


def sweep_temp_files(config: Config) -> list[Path]:
    """Uploads cut short and our own half-written files; nobody else's (runs before we serve)."""
    shutil.rmtree(config.data_dir / "tmp", ignore_errors=True)
    removed: list[Path] = []
    for folder in dict.fromkeys([config.ed_lora_dir, config.data_dir]):
        removed.extend(publish.sweep_temp_files(folder))
    if removed:
        log.warning("removed temporary files left by an interrupted run: %s", ", ".join(map(str, removed)))
    return removed


def published_file(state: JobState, recorded: Path | None, found: Path | None,
                   verifies: Callable[[Path], bool]) -> Path | None:
    """The LoRA a job left in ED's folder, if any: then the job is done, never failed or interrupted.

    `recorded` is the artifact the job saved; `found` the file recovery matched to its output (only a
    job that was copying can have published without recording it).
    """
    candidates = [recorded] if recorded is not None else []
    if state is JobState.COPYING and found is not None:
        candidates.append(found)
    return next((path for path in candidates if path.is_file() and verifies(path)), None)


def _verifies(path: Path) -> bool:
    try:
        publish.verify_lora(path)
    except publish.PublishError:
        return False
    return True


def finish_copy(config: Config, job: Job, stem: str) -> Path | None:
    """The copy into ED's folder of a job that was copying: training was over, its LoRA is complete in the job's
    output folder (kohya had saved it before the copy began), so it is published now rather than trained again."""
    output = job_paths(config, job.id).output / f"{stem}.safetensors"
    arch = job.params.get("arch")
    try:
        return publish.publish_verified(output, config.ed_lora_dir, stem,
                                        expected_arch=arch if isinstance(arch, str) else None)
    except publish.PublishError as exc:
        log.warning("job %s: its trained LoRA could not be published after the restart: %s", job.id, exc.message)
        return None


def recover_job(config: Config, store: JobStore, job_id: str, taken: set[Path]) -> Job | None:
    """Settle one job the dead daemon was running; `taken` (artifacts of all jobs) grows by what it claims."""
    killed: list[ProcInfo] = []
    row = store.process_of(job_id)
    if row is not None:
        killed = kill_leftovers(TrainerRecord(row.pid, row.started, row.descendants))
        store.set_process(job_id, None, None)
    job = store.get(job_id)
    if job is None:
        return None
    notes: list[str] = []
    if killed:
        listed = ", ".join(f"{p.pid} ({p.name})" for p in killed)
        log.warning("job %s: stopped trainer processes left running by the previous daemon: %s", job_id, listed)
        notes.append(f"After a restart, stopped the trainer processes left running: {listed}")
    stem = output_name(job)
    found = None
    if job.state is JobState.COPYING:
        output = job_paths(config, job_id).output / f"{stem}.safetensors"
        found = publish.find_published(output, config.ed_lora_dir, stem, taken=frozenset(taken))
    recorded = Path(job.artifact) if job.artifact else None
    published = published_file(job.state, recorded, found, _verifies)
    was = job.state.value
    copied = False
    if published is None and job.state is JobState.COPYING:
        published = finish_copy(config, job, stem)
        copied = published is not None
    if published is not None:
        job.state, job.error, job.artifact = JobState.DONE, None, str(published)
        # ValueError: recorded under another lora folder (the config changed): keep the id it had
        with contextlib.suppress(ValueError):
            job.lora_id = publish.lora_id(published, config.ed_lora_dir)
        taken.add(published)
        # done: nothing will resume from its saved training states
        train_state.remove_states(job_paths(config, job_id).output, stem)
        job.recovery.state_epoch, job.recovery.state_bytes, job.recovery.resume_next = None, 0, False
        if copied:
            log.warning("job %s was copying when the daemon stopped; finished copying its LoRA to %s: done", job_id,
                        published)
            notes.append(f"The daemon stopped while it copied this job's LoRA; finished copying it: {published}")
        else:
            log.warning("job %s was %s when the daemon stopped; its LoRA %s is complete: done", job_id, was, published)
            notes.append(f"The daemon stopped while this job was {was}; the LoRA had been published: {published}")
    else:
        job.state, job.error = JobState.INTERRUPTED, interrupted_error()
        # its saved training state is kept: the job resumes from it (by hand, or at start-up with auto_resume)
        train_state.record_states(job.recovery, job_paths(config, job_id).output, stem)
        job.recovery.resume_next = False
        log.warning("job %s was %s when the daemon stopped: interrupted", job_id, was)
    store.save(job)
    store.append_logs(job_id, notes)
    return job
