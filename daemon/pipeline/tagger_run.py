"""Tagging runs: kohya's WD14 tagger over a few pictures, supervised like the trainer, one at a time.

The runs live in memory only: a daemon restart forgets them (and sweep_temp_files removes their folders), which
costs nothing but running the tagger again. A run is kept after it ends until the client deletes it (or until
MAX_KEPT newer ones ended), so a tab that reloads can still read its tags.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import LiveConfig
from daemon.errors import Conflict, DaemonError, EnvProblem, NotFound
from daemon.pipeline import dataset
from daemon.pipeline.process import TrainerProcess, start_trainer
from daemon.pipeline.tagger import (
    BATCH_SIZE,
    SUGGEST_RULE,
    OnnxProbe,
    Readiness,
    TaggerProgress,
    build_argv,
    failure_sentence,
    read_tags,
    readiness,
    summarize,
    tagger_env,
    tagger_setup,
)

log = logging.getLogger(__name__)

# The tagger pads every picture to a square and scales it to 448 px: a smaller copy loses nothing and is quick.
PREP_RESOLUTION = 768
# The first run downloads a model of a few hundred MB; after that a run takes seconds.
RUN_TIMEOUT_S = 1800
MAX_KEPT = 8
STDERR_TAIL = 40

Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class TaggingRun:
    task_id: str
    total: int
    state: str = "running"  # running -> done | error | cancelled
    phase: str = "preparing"  # preparing -> starting -> downloading (first use only) -> tagging
    done: int = 0
    error: str | None = None
    tags: list[list[str]] | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def event(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "state": self.state, "phase": self.phase, "done": self.done,
                "total": self.total, "error": self.error}

    def to_json(self) -> dict[str, Any]:
        per_picture = self.tags or []
        return {**self.event(),
                "pictures": [{"index": i, "tags": tags} for i, tags in enumerate(per_picture)],
                "tags": [t.to_json() for t in summarize(per_picture)],
                "rule": SUGGEST_RULE}


class TaggerRuns:
    """The registry: start, read, cancel, and stop everything at shutdown."""

    def __init__(self, live: LiveConfig, emit: Emit, training: Callable[[], bool]) -> None:
        self._live = live
        self._emit = emit
        self._training = training
        self.probe = OnnxProbe()
        # The readiness check may run a probe for up to a minute: requests that ask meanwhile wait here, not in
        # worker threads of their own, which every other handler's file and database work needs.
        self._asking = asyncio.Lock()
        self._runs: collections.OrderedDict[str, TaggingRun] = collections.OrderedDict()

    async def readiness(self) -> Readiness:
        async with self._asking:
            return await asyncio.to_thread(readiness, tagger_setup(self._live.current), self.probe)

    @property
    def running(self) -> TaggingRun | None:
        return next((r for r in self._runs.values() if r.state == "running"), None)

    async def start(self, uploads: Sequence[dataset.Upload], upload_dir: Path, threshold: float) -> TaggingRun:
        """Start tagging the stored `uploads` (the run owns `upload_dir` from here on, also when this raises)."""
        try:
            self._check_free()
            ready = await self.readiness()
            if not ready.available:
                first = ready.problems[0]
                raise EnvProblem(f"The tagger cannot run: {first.detail}.", hint=first.fix)
            self._check_free()  # again: another request may have started one while the readiness was checked
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        run = TaggingRun(task_id=secrets.token_hex(6), total=len(uploads))
        self._runs[run.task_id] = run
        self._trim()
        run.task = asyncio.create_task(self._run(run, list(uploads), upload_dir, threshold))
        return run

    def _check_free(self) -> None:
        if (other := self.running) is not None:
            raise Conflict(f"The tagger is already running ({other.task_id}); one run at a time.",
                           hint="Wait for it to finish or cancel it.")
        if self._training():
            raise Conflict("A training job is running; tag the pictures when it has finished (the tagger would "
                           "compete with it for the GPU).", hint="Captions can still be typed by hand.")

    def _trim(self) -> None:
        finished = [tid for tid, r in self._runs.items() if r.state != "running"]
        for tid in finished[:max(0, len(self._runs) - MAX_KEPT)]:
            del self._runs[tid]

    def get(self, task_id: str) -> TaggingRun:
        run = self._runs.get(task_id)
        if run is None:
            raise NotFound(f"There is no tagging run {task_id} (a daemon restart forgets them).")
        return run

    async def forget(self, task_id: str) -> TaggingRun:
        """Cancel the run if it still runs (its process tree is killed before this returns), then forget it."""
        run = self.get(task_id)
        await self._stop(run)
        self._runs.pop(task_id, None)
        return run

    async def close(self) -> None:
        for run in list(self._runs.values()):
            await self._stop(run)

    async def _stop(self, run: TaggingRun) -> None:
        if run.task is not None and not run.task.done():
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)

    async def _announce(self, run: TaggingRun) -> None:
        try:
            await self._emit(run.event())
        except Exception:  # a broken event must never stop the run
            log.exception("could not send the tagging event")

    async def _run(self, run: TaggingRun, uploads: list[dataset.Upload], upload_dir: Path, threshold: float) -> None:
        config = self._live.current
        work = config.data_dir / "tmp" / f"tagger-{run.task_id}"
        try:
            await self._announce(run)
            folder = work / "pictures"
            prepared = await asyncio.to_thread(_prepare, uploads, folder)
            setup = tagger_setup(config)
            argv = build_argv(setup, folder.absolute(), threshold=threshold)
            run.phase = "starting"
            await self._announce(run)
            log.info("tagging %d picture(s): %s", run.total, argv)
            proc = await start_trainer(argv, cwd=str(work), env=tagger_env(os.environ))
            try:
                code, tail = await asyncio.wait_for(self._watch(run, proc), RUN_TIMEOUT_S)
            finally:
                await proc.terminate_tree(grace_s=2.0)  # a cancel, a timeout, or what it left running
            if code != 0:
                raise _Failed(failure_sentence(code, tail))
            run.tags = await asyncio.to_thread(read_tags, folder, prepared)
            run.done, run.state = run.total, "done"
        except asyncio.CancelledError:
            run.state, run.error = "cancelled", "The tagging was cancelled."
            raise
        except asyncio.TimeoutError:
            minutes = RUN_TIMEOUT_S // 60
            run.state, run.error = "error", f"The tagger took longer than {minutes} minutes and was stopped."
        except (_Failed, DaemonError) as exc:
            run.state, run.error = "error", str(exc) if isinstance(exc, _Failed) else exc.message
        except OSError as exc:
            run.state, run.error = "error", f"The tagger could not be started or its files written ({exc})."
        finally:
            await asyncio.to_thread(_remove, work, upload_dir)
            log.info("tagging run %s: %s%s", run.task_id, run.state, f" ({run.error})" if run.error else "")
            await self._announce(run)

    async def _watch(self, run: TaggingRun, proc: TrainerProcess) -> tuple[int, list[str]]:
        progress = TaggerProgress()
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        partial = ""
        async for chunk in proc.output():
            if chunk.stream != "stderr":
                continue
            lines = (partial + chunk.text).replace("\r", "\n").split("\n")
            partial = lines.pop()
            tail.extend(line for line in lines if line.strip())
            if progress.feed(chunk.text):
                await asyncio.to_thread(proc.remember_descendants)
                run.phase, run.done = progress.phase, progress.pictures_done(run.total, BATCH_SIZE)
                await self._announce(run)
        if partial.strip():
            tail.append(partial)
        return await proc.wait(), list(tail)


class _Failed(Exception):
    pass


def _prepare(uploads: Sequence[dataset.Upload], folder: Path) -> list[Path]:
    """The pictures as the trainer gets them (upright, RGB on white), smaller: `NNN.png` in `folder`."""
    prepared = dataset.prepare_images(uploads, folder, size=PREP_RESOLUTION, text="")
    for item in prepared:  # prep writes an empty caption beside each picture; the tagger writes the real ones
        item.path.with_suffix(".txt").unlink(missing_ok=True)
    return [item.path for item in prepared]


def _remove(*folders: Path) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
