"""The FIFO of jobs: one trains at a time; cancel, delete, and recovery after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from daemon.config import Config
from daemon.errors import Conflict, NotFound
from daemon.events import EventType
from daemon.hub import EventHub
from daemon.jobs.models import Job, JobError, JobState
from daemon.jobs.store import JobStore
from daemon.pipeline.process import kill_tree
from daemon.pipeline.runner import JobRunner, job_paths

log = logging.getLogger(__name__)

_ACTIVE = (JobState.PREPPING, JobState.TRAINING, JobState.COPYING)


class JobQueue:
    def __init__(self, config: Config, store: JobStore, hub: EventHub, runner: JobRunner) -> None:
        self._config = config
        self._store = store
        self._hub = hub
        self._runner = runner
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._cancels: dict[str, asyncio.Event] = {}
        self._current: str | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def current(self) -> str | None:
        return self._current

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)
        for job_id in await asyncio.to_thread(self._store.ids_in_states, [JobState.QUEUED]):
            self._pending.put_nowait(job_id)
        self._worker = asyncio.create_task(self._work(), name="job-worker")

    async def stop(self) -> None:
        """Shutdown: the running trainer is killed (tree) and its job marked interrupted."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def _recover(self) -> None:
        """Jobs that were running when the daemon died: kill any trainer left over, mark them interrupted."""
        for job_id in self._store.ids_in_states(_ACTIVE):
            proc = self._store.process_of(job_id)
            if proc is not None:
                killed = kill_tree(proc[0], proc[1], grace_s=3.0)
                if killed:
                    log.warning("killed trainer processes %s left over from job %s", killed, job_id)
                self._store.set_process(job_id, None, None)
            job = self._store.get(job_id)
            if job is None:
                continue
            job.state = JobState.INTERRUPTED
            job.error = JobError(
                "interrupted",
                "The daemon stopped while this job was running.",
                "Start the job again with the same pictures.",
            )
            self._store.save(job)

    async def submit(self, job: Job) -> None:
        await asyncio.to_thread(self._store.insert, job)
        await self._hub.emit(EventType.JOB_CREATED, job.id, job.to_json())
        self._pending.put_nowait(job.id)

    async def cancel(self, job_id: str) -> Job:
        job = await self._get(job_id)
        if job.state.finished:
            raise Conflict(f"Job {job_id} is already {job.state.value}; there is nothing to cancel.")
        if job.state is JobState.QUEUED and self._current != job_id:
            job.state = JobState.CANCELLED
            await asyncio.to_thread(self._store.save, job)
            data = {"state": job.state.value, "error": None, "artifact": None, "lora_id": None}
            await self._hub.emit(EventType.STATE, job.id, data)
            await self._hub.emit(EventType.RESULT, job.id, data)
            return job
        self._cancels.setdefault(job_id, asyncio.Event()).set()
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
        job = await self._get(job_id)
        if job.state.active or (job.state is JobState.QUEUED and self._current == job_id):
            raise Conflict(
                f"Job {job_id} is {job.state.value}; cancel it before deleting it.",
                hint=f"POST /jobs/{job_id}/cancel first.",
            )
        if job.state is JobState.QUEUED:
            await self.cancel(job_id)
        # Only the job's working files; a LoRA published into ED's folder stays.
        await asyncio.to_thread(shutil.rmtree, job_paths(self._config, job_id).root, True)
        await asyncio.to_thread(self._store.delete, job_id)
        await self._hub.emit(EventType.JOB_DELETED, job_id, {})

    async def _get(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self._store.get, job_id)
        if job is None:
            raise NotFound(f"There is no job {job_id}.")
        return job

    async def _work(self) -> None:
        while True:
            job_id = await self._pending.get()
            job = await asyncio.to_thread(self._store.get, job_id)
            if job is None or job.state is not JobState.QUEUED:
                continue
            cancel = self._cancels.setdefault(job_id, asyncio.Event())
            self._current = job_id
            try:
                await self._runner.run(job, cancel)
            finally:
                self._current = None
                self._cancels.pop(job_id, None)
