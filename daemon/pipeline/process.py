"""The only place the daemon starts a program: the trainer, in its own process group, killed as a tree.

`accelerate launch` leaves its python child running when only the launcher is signalled, so the
trainer gets its own session/process group and every stop signals the whole tree (psutil), then the
group, then kills what is left.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

IS_WINDOWS = sys.platform == "win32"
NO_WINDOW: int = getattr(subprocess, "CREATE_NO_WINDOW", 0)


@dataclass(frozen=True)
class OutputChunk:
    stream: str  # "stdout" or "stderr"
    text: str


class TrainerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        try:
            self.started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            self.started = 0.0
        # Descendants seen while the trainer ran: once it exits, its orphans can no longer be found
        # through it (and Windows has no process group to signal).
        self._descendants: dict[int, float] = {}

    def remember_descendants(self) -> bool:
        """Note the trainer's current descendants; True when there are new ones (worth persisting)."""
        before = len(self._descendants)
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self._descendants.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass
        return len(self._descendants) > before

    @property
    def descendants(self) -> dict[int, float]:
        """pid -> create time of every descendant seen so far."""
        return dict(self._descendants)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def output(self) -> AsyncIterator[OutputChunk]:
        """Both pipes, decoded as UTF-8 (bad bytes replaced), in arrival order, until both close.

        Read ahead by a few chunks only: a trainer printing faster than its output is consumed waits
        on its pipe rather than filling the daemon's memory.
        """
        queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue(maxsize=8)

        async def pump(name: str, reader: asyncio.StreamReader | None) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                while reader is not None:
                    data = await reader.read(65536)
                    if not data:
                        break
                    text = decoder.decode(data)
                    if text:
                        await queue.put(OutputChunk(name, text))
                tail = decoder.decode(b"", final=True)
                if tail:
                    await queue.put(OutputChunk(name, tail))
            finally:
                await queue.put(None)

        tasks = [
            asyncio.create_task(pump("stdout", self._proc.stdout)),
            asyncio.create_task(pump("stderr", self._proc.stderr)),
        ]
        open_streams = len(tasks)
        try:
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            # gather, not suppress(CancelledError): a cancel aimed at our caller must still get through
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self) -> int:
        """The exit code, as soon as the trainer exits.

        Not Process.wait(): that also waits for the pipes to close, which a left-over grandchild can
        postpone forever.
        """
        while (code := self._proc.returncode) is None:
            await asyncio.sleep(0.1)
        return code

    async def terminate_tree(self, grace_s: float = 5.0) -> None:
        """SIGTERM the whole tree (and group), wait up to `grace_s`, then SIGKILL whatever is left.

        Also after the trainer itself has exited: whatever it left running is still ours to stop.
        """
        await asyncio.to_thread(self.remember_descendants)
        await asyncio.to_thread(
            kill_tree, self.pid, self.started, grace_s, extra=dict(self._descendants), group=True
        )
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            await asyncio.wait_for(self.wait(), timeout=grace_s + 5)


async def start_trainer(argv: Sequence[str], *, cwd: str, env: Mapping[str, str]) -> TrainerProcess:
    """Start `argv` (never through a shell) with piped output, stdin closed, in a new process group."""
    kwargs: dict[str, object] = {}
    if IS_WINDOWS:
        # No console window: started from ED the daemon has none, and closing a new one would kill training.
        kwargs["creationflags"] = NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **kwargs,  # type: ignore[arg-type]
    )
    return TrainerProcess(proc)


def kill_tree(pid: int, started: float | None = None, grace_s: float = 5.0, *,
              extra: dict[int, float] | None = None, group: bool = False) -> list[int]:
    """Stop `pid` and all its descendants. Returns the pids signalled.

    `started` (psutil create_time) guards against killing an unrelated process that reused the pid
    after a daemon restart; `extra` are more (pid, create_time) pairs known to belong to the tree.
    `group=True` signals the process group even when its leader is gone (only for a trainer this
    daemon is running: its group cannot have been reused while members remain).
    """
    procs: list[psutil.Process] = []
    try:
        root = psutil.Process(pid)
        if started and abs(root.create_time() - started) > 1.0:
            return []
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for other_pid, created in (extra or {}).items():
        with contextlib.suppress(psutil.Error):
            other = psutil.Process(other_pid)
            if abs(other.create_time() - created) <= 1.0 and other.pid not in {p.pid for p in procs}:
                procs.append(other)
    group = group or bool(procs)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    if not IS_WINDOWS and group:
        # Descendants that re-parented away from the tree still share the trainer's process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if not IS_WINDOWS and group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=2)
    return [p.pid for p in procs]
