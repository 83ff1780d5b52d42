"""A standby trainer (issue 9 §3, config.fast_start): one kohya python that has done its imports before the click.

kohya's python and imports take ~18 s of a ~36 s start on an H200 (bench/RESULTS.md "Quicker start"), and the
per-job prestart (fast_start.py) overlaps only the ~4 s of prep with them. So while the tab is open (it asks
GET /models and GET /fit when it opens and as the form changes: `interest()`), the daemon keeps ONE prestarted
kohya_prestart.py waiting, with the SDXL script imported (it imports train_network, so both families' modules are
loaded), and the next job takes it instead of starting its own: `claim()`, called at the start of every job's prep.
The job then tells it which script (SD 1.x or SDXL) and which argv to run, exactly as with the per-job prestart.

Rules (why):
- never while a job runs: it would compete with the trainer for RAM and CPU. No standby is started while the queue
  has a job, and every job claims the waiting one at its start and either uses it or kills it, so none is ever
  left beside a training run. A new one is started once the job has ended, if the tab showed interest within
  IDLE_S;
- at most one, only with kohya.python set (`accelerate launch` starts the script in a child of its own: nothing
  can be prestarted) and fast_start on;
- killed after IDLE_S without interest, when a config reload changes what it was started with (kohya's python,
  script, workspace, tokenizer folder, the device), and on shutdown; it exits by itself when the daemon is gone
  (kohya_prestart.py's parent check, POSIX) and after IDLE_S + a margin without a go signal (everywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from daemon.config import Config, LiveConfig
from daemon.pipeline import kohya
from daemon.pipeline.env_check import GpuInfo
from daemon.pipeline.process import TrainerProcess, start_trainer

log = logging.getLogger(__name__)

IDLE_S = 600.0  # since the last sign of interest: the tab was closed or left alone
TICK_S = 1.0
MAX_WAIT_MARGIN_S = 120.0


@dataclass(frozen=True)
class StandbySpec:
    """What a standby was started with; a job can take it only when its own launch is the same."""

    python: str
    train_network: str  # the configured train_network.py; the SDXL script lies beside it
    workspace: str
    env: tuple[tuple[str, str], ...]

    @property
    def import_script(self) -> str:
        """The script the standby imports: SDXL's when present (it imports train_network too), else SD 1.x's."""
        sdxl = kohya.script_for("sdxl", Path(self.train_network))
        return str(sdxl) if sdxl.is_file() else self.train_network


def spec_for(config: Config, cpu: bool, base_env: dict[str, str] | None = None) -> StandbySpec | None:
    """The standby `config` allows, or None (fast_start off, no kohya.python, kohya not set up)."""
    k = config.kohya
    if not config.fast_start or k.python is None or k.script_path is None or k.workspace is None:
        return None
    if not Path(k.script_path).is_file() or not Path(k.workspace).is_dir():
        return None
    env = kohya.build_env(os.environ if base_env is None else base_env,
                          tokenizer_cache_dir=str(k.tokenizer_cache_dir) if k.tokenizer_cache_dir else None, cpu=cpu)
    return StandbySpec(python=str(k.python), train_network=str(k.script_path), workspace=str(k.workspace),
                       env=tuple(sorted(env.items())))


def ready_file(go_file: Path) -> Path:
    """Created by the standby once its imports are done."""
    return go_file.with_name(go_file.name + ".ready")


@dataclass
class Waiting:
    """A started standby, not yet taken by a job."""

    proc: TrainerProcess
    spec: StandbySpec
    go_file: Path
    config: Config  # the settings it was started under: only a reload (a new Config) can change its spec


class Standby:
    """The one standby trainer of a daemon: started on interest while no job runs, handed to the next job."""

    def __init__(self, live: LiveConfig, gpu: Callable[[], Awaitable[GpuInfo]], busy: Callable[[], bool], *,
                 watching: Callable[[], bool] = lambda: False, idle_s: float = IDLE_S, tick_s: float = TICK_S) -> None:
        self._live = live
        self._gpu = gpu
        self._busy = busy
        self._watching = watching  # a tab is connected (WebSocket): one that follows a job is still in use
        self.idle_s = idle_s
        self._tick_s = tick_s
        self._last_interest: float | None = None
        self._waiting: Waiting | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------- outside
    def interest(self) -> None:
        """The tab is in use (it asked /models or /fit)."""
        self._last_interest = time.monotonic()
        self._wake.set()

    @property
    def pid(self) -> int | None:
        w = self._waiting
        return w.proc.pid if w is not None and w.proc.returncode is None else None

    @property
    def ready(self) -> bool:
        w = self._waiting
        return w is not None and w.proc.returncode is None and ready_file(w.go_file).exists()

    def rss(self) -> int | None:
        """Resident memory of the waiting standby (bytes), None when there is none."""
        pid = self.pid
        if pid is None:
            return None
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None

    async def claim(self) -> Waiting | None:
        """Take the waiting standby (called at the start of every job); the caller uses it or kills it."""
        async with self._lock:
            w, self._waiting = self._waiting, None
        if w is not None and w.proc.returncode is not None:
            return None
        return w

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="standby trainer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            await self._kill_waiting("the daemon is stopping")

    # ------------------------------------------------------------------------------------------- inside
    def _wanted(self) -> bool:
        recent = self._last_interest is not None and time.monotonic() - self._last_interest < self.idle_s
        return recent and not self._busy()

    async def _supervise(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a standby is only ever a head start: never let it take the daemon down
                log.exception("the standby trainer failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick_s)

    async def _step(self) -> None:
        async with self._lock:
            if self._busy() and self._last_interest is not None and self._watching():
                self._last_interest = time.monotonic()  # the tab follows the job: a standby is wanted after it
            w = self._waiting
            recent = self._last_interest is not None and time.monotonic() - self._last_interest < self.idle_s
            if w is not None:
                if w.proc.returncode is not None:
                    self._waiting = None
                    log.info("the standby trainer exited (code %s)", w.proc.returncode)
                elif not recent:
                    await self._kill_waiting("no interest for a while")
                elif self._live.current is not w.config and await self._spec() != w.spec:
                    await self._kill_waiting("the kohya settings changed")
            if self._waiting is None and self._wanted():
                spec = await self._spec()
                if spec is not None:
                    await self._spawn(spec)

    async def _spec(self) -> StandbySpec | None:
        config = self._live.current
        if spec_for(config, cpu=False) is None:
            return None
        gpu = await self._gpu()
        if not gpu.cuda and not config.allow_cpu:
            return None  # the job would fail with no_gpu
        return spec_for(config, cpu=not gpu.cuda)

    async def _spawn(self, spec: StandbySpec) -> None:
        # Local import: fast_start imports this module.
        from daemon.pipeline.fast_start import prestart_argv

        config = self._live.current
        go_file = config.data_dir / f"standby-{secrets.token_hex(6)}-go.json"
        argv = prestart_argv(spec.python, spec.import_script, go_file,
                             max_wait_s=self.idle_s + MAX_WAIT_MARGIN_S, ready=ready_file(go_file))
        try:
            go_file.parent.mkdir(parents=True, exist_ok=True)
            proc = await start_trainer(argv, cwd=spec.workspace, env=dict(spec.env))
        except OSError as exc:
            log.info("the standby trainer could not be started: %s", exc)
            self._last_interest = None  # not again until the tab asks again
            return
        self._waiting = Waiting(proc=proc, spec=spec, go_file=go_file, config=config)
        log.info("standby trainer started (pid %d)", proc.pid)

    async def _kill_waiting(self, why: str) -> None:
        w, self._waiting = self._waiting, None
        if w is None:
            return
        log.info("stopping the standby trainer (pid %d): %s", w.proc.pid, why)
        await w.proc.terminate_tree()
        with contextlib.suppress(OSError):
            w.go_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ready_file(w.go_file).unlink(missing_ok=True)
