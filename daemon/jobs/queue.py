"""The FIFO of jobs: one trains at a time; cancel, delete, resume, and recovery after a restart."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from daemon.config import Config, LiveConfig
from daemon.errors import Conflict, NotFound, TooMany
from daemon.events import EventType
from daemon.hub import EventHub
from daemon.jobs.models import Job, JobError, JobState
from daemon.jobs.recovery import recover_job
from daemon.jobs.store import JobStore
from daemon.pipeline import train_state
from daemon.pipeline.runner import JobRunner, job_paths, output_name

log = logging.getLogger(__name__)

_ACTIVE = (JobState.PREPPING, JobState.TRAINING, JobState.COPYING)
# Automatic resumes in a row that each ended with the daemon dying (a clean stop resets the count): a job that takes
# the daemon down each time it runs must not loop.
MAX_AUTO_RESUMES = 3


class JobQueue:
    def __init__(self, config: LiveConfig, store: JobStore, hub: EventHub,
                 runner: Callable[[Config], JobRunner]) -> None:
        self._live = config
        self._store = store
        self._hub = hub
        # A runner per job, made with the settings in force when the job starts: a reload never changes a
        # job under way (its device, trainer, folders), and the next job gets the new settings.
        self._runner = runner
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._cancels: dict[str, asyncio.Event] = {}
        self._current: str | None = None
        self._worker: asyncio.Task[None] | None = None
        self._submitting = asyncio.Lock()
        self._resuming: dict[str, str] = {}  # job id -> "resumed" | "auto_resumed", until its run starts
        # Jobs whose folder DELETE is removing (its row goes last): a resume meanwhile would run a deleted job.
        self._deleting: set[str] = set()

    @property
    def current(self) -> str | None:
        return self._current

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)
        # In the order the jobs were made, first in first out: the job that was training when the daemon died goes
        # on before the jobs that were waiting behind it.
        resuming = self._live.current.auto_resume
        states = [JobState.QUEUED, JobState.INTERRUPTED] if resuming else [JobState.QUEUED]
        for job_id in await asyncio.to_thread(self._store.ids_in_states, states):
            job = await asyncio.to_thread(self._store.get, job_id)
            if job is not None and job.state is JobState.QUEUED:
                self._pending.put_nowait(job_id)
            elif job is not None:
                await self._auto_resume(job)
        self._worker = asyncio.create_task(self._work(), name="job-worker")

    async def stop(self) -> None:
        """Shutdown: the running trainer is killed (tree) and its job marked interrupted."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def _recover(self) -> None:
        """Jobs that were running when the daemon died: stop their trainer tree, then done or interrupted."""
        taken = {Path(artifact) for artifact in self._store.artifacts()}
        for job_id in self._store.ids_in_states(_ACTIVE):
            recover_job(self._live.current, self._store, job_id, taken)

    async def _auto_resume(self, job: Job) -> None:
        """At start-up: a job a crash or shutdown interrupted continues from its saved state, if it has one."""
        job_id = job.id
        state = await asyncio.to_thread(self._saved_state, job)
        if state is None:
            return  # nothing to continue from: it waits for the user (POST /jobs/{id}/resume trains it again)
        if job.recovery.auto_resumes >= MAX_AUTO_RESUMES:
            note = (f"Not resumed automatically: it was already resumed automatically {job.recovery.auto_resumes} "
                    "times and the daemon stopped each time. Resume it by hand when the cause is fixed.")
            if not job.recovery.notices or job.recovery.notices[-1] != note:
                job.recovery.notices.append(note)
                log.warning("job %s: %s", job_id, note)
                await asyncio.to_thread(self._store.save, job)
                await asyncio.to_thread(self._store.append_logs, job_id, [note])
            return
        log.info("job %s: resuming automatically from the state saved after epoch %d", job_id, state.epoch)
        await self._requeue(job, state, "auto_resumed")

    async def resume(self, job_id: str) -> Job:
        """POST /jobs/{id}/resume: an interrupted job is queued again, to continue from its saved state (or
        from the first step when there is none). It keeps its id, logs, previews and progress."""
        async with self._submitting:
            job = await self._get(job_id)
            if job_id in self._deleting:
                raise Conflict(f"Job {job_id} is being deleted; it cannot be resumed.")
            if job.state is not JobState.INTERRUPTED:
                raise Conflict(f"Job {job_id} is {job.state.value}; only an interrupted job can be resumed.")
            await self.check_room()
            state = await asyncio.to_thread(self._saved_state, job)
            await self._requeue(job, state, "resumed")
        return job

    def _saved_state(self, job: Job) -> train_state.SavedState | None:
        """The job's resume point now, with its bookkeeping (recovery.state_epoch / state_bytes) brought up to date."""
        return train_state.record_states(job.recovery, job_paths(self._live.current, job.id).output, output_name(job))

    async def _requeue(self, job: Job, state: train_state.SavedState | None, kind: str) -> None:
        job.state, job.error = JobState.QUEUED, None
        job.recovery.resume_next = state is not None
        self._resuming[job.id] = kind
        await self._hub.emit(EventType.STATE, job.id, job.state_data(), persist=partial(self._store.save, job))
        self._pending.put_nowait(job.id)

    async def check_room(self) -> None:
        """TooMany when `max_queued_jobs` jobs already wait; /train asks before it stores any picture."""
        waiting = len(await asyncio.to_thread(self._store.ids_in_states, [JobState.QUEUED]))
        limit = self._live.current.max_queued_jobs
        if waiting >= limit:
            raise TooMany(f"The queue is full: {waiting} job(s) are waiting, at most {limit} "
                          "may (max_queued_jobs).",
                          hint="Wait for a job to finish (or cancel one), then start this one again.")

    async def submit(self, job: Job) -> None:
        async with self._submitting:  # check and insert as one step: two uploads cannot both take the last place
            await self.check_room()
            await self._hub.emit(EventType.JOB_CREATED, job.id, job.to_json(),
                                 persist=partial(self._store.insert, job))
        self._pending.put_nowait(job.id)

    async def cancel(self, job_id: str) -> Job:
        job = await self._get(job_id)
        if job.state.finished:
            raise Conflict(f"Job {job_id} is already {job.state.value}; there is nothing to cancel.")
        # Set before any await: the worker checks it when it takes the job, the runner while it runs.
        self._cancels.setdefault(job_id, asyncio.Event()).set()
        if job.state is JobState.QUEUED and self._current != job_id:
            job.state = JobState.CANCELLED
            self._resuming.pop(job_id, None)
            # a resumed job waiting to run: cancelled, it can no longer be resumed, so its states go
            output = job_paths(self._live.current, job_id).output
            await asyncio.to_thread(train_state.remove_states, output, output_name(job))
            job.recovery.state_epoch, job.recovery.state_bytes, job.recovery.resume_next = None, 0, False
            await self._hub.emit(EventType.STATE, job.id, job.state_data(), persist=partial(self._store.save, job))
            await self._hub.emit(EventType.RESULT, job.id, job.state_data())
        return job

    async def wait_finished(self, job_id: str, timeout: float) -> Job:
        """Poll until a job reaches a final state (used by cancel so the reply shows the outcome)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        job = await self._get(job_id)
        while not job.state.finished and loop.time() < end:
            await asyncio.sleep(0.05)
            job = await self._get(job_id)
        return job

    async def delete(self, job_id: str) -> None:
        # Checked and marked under the lock resume() takes: a resume either ran before (the job is queued, so it
        # is cancelled here) or sees the mark; it can never queue the job while its folder is being removed.
        async with self._submitting:
            job = await self._get(job_id)
            if job_id in self._deleting:
                raise Conflict(f"Job {job_id} is already being deleted.")
            if job.state.active or self._current == job_id:
                raise Conflict(
                    f"Job {job_id} is {job.state.value}; cancel it before deleting it.",
                    hint=f"POST /jobs/{job_id}/cancel first.",
                )
            self._deleting.add(job_id)
        try:
            if job.state is JobState.QUEUED:
                await self.cancel(job_id)
                if self._current == job_id:  # the worker took it while cancel() read the store
                    raise Conflict(f"Job {job_id} was just starting; it is being cancelled.",
                                   hint="Delete it once it shows as cancelled.")
            # Only the job's working files; a LoRA published into ED's folder stays.
            await asyncio.to_thread(shutil.rmtree, job_paths(self._live.current, job_id).root, True)
            await self._hub.emit(EventType.JOB_DELETED, job_id, {}, persist=partial(self._store.delete, job_id))
            self._cancels.pop(job_id, None)
        finally:
            self._deleting.discard(job_id)

    async def _get(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self._store.get, job_id)
        if job is None:
            raise NotFound(f"There is no job {job_id}.")
        return job

    async def _work(self) -> None:
        while True:
            job_id = await self._pending.get()
            self._current = job_id  # before any await, so cancel/delete see the job as taken
            try:
                cancel = self._cancels.setdefault(job_id, asyncio.Event())
                if cancel.is_set():
                    continue  # cancelled while queued; cancel() already recorded it
                job = await asyncio.to_thread(self._store.get, job_id)
                if job is None or job.state is not JobState.QUEUED:
                    continue
                await self._runner(self._live.current).run(job, cancel, resumed=self._resuming.pop(job_id, None))
            except asyncio.CancelledError:
                raise
            except Exception:
                # One job's broken error path (a full disk, say) must not stop every later job.
                log.exception("the worker failed on job %s", job_id)
                await self._mark_failed(job_id)
            finally:
                self._current = None
                self._cancels.pop(job_id, None)
                self._resuming.pop(job_id, None)

    async def _mark_failed(self, job_id: str) -> None:
        try:
            job = await asyncio.to_thread(self._store.get, job_id)
            if job is not None and not job.state.finished:
                if job.artifact is not None and Path(job.artifact).is_file():
                    # The LoRA reached ED's folder before the failure: the user has it.
                    job.state, job.error = JobState.DONE, None
                else:
                    job.state = JobState.ERROR
                    job.error = JobError("internal", "The daemon failed while running this job.",
                                         "See the daemon's console output, then start the job again.")
                await self._hub.emit(EventType.RESULT, job_id, job.state_data(), persist=partial(self._store.save, job))
        except Exception:
            log.exception("could not record the failure of job %s", job_id)
