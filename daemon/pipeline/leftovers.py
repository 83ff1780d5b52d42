"""A trainer left running by a daemon that died (SIGKILL, crash): find its whole tree, and only its tree.

When the daemon dies, the trainer usually dies too (a broken pipe) but what it started lives on:
re-parented to init, so no longer its descendants, yet still in the session that `start_trainer`
opened for it (session id = process group id = the trainer's pid). Recovery therefore looks for

- the recorded trainer and remembered descendants, each matched by (pid, create time);
- every process of the recorded session created after the trainer started;
- the descendants of all of these that were created after the trainer started;

and refuses anything recorded before this boot. A pid, session id or group id cannot be reused while
a process still holds it (POSIX), so a session that still has members is the trainer's own unless a
stranger now owns the leader's pid — which means the old session had emptied first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

from daemon.pipeline.process import IS_WINDOWS

log = logging.getLogger(__name__)

# psutil derives create times from clock ticks since boot: equal processes may differ by a tick or so.
CREATE_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class TrainerRecord:
    """What the store keeps about a running trainer so that a later daemon can stop it."""

    pid: int
    started: float  # the trainer's create time (psutil); 0 when unknown
    descendants: Mapping[int, float]  # pid -> create time, as seen while it ran


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    created: float
    session: int | None  # None on Windows or when it cannot be read
    group: int | None
    name: str


def scan() -> list[ProcInfo]:
    """A snapshot of every live process we can see."""
    found: list[ProcInfo] = []
    for proc in psutil.process_iter(["pid", "ppid", "create_time", "name", "status"]):
        info = proc.info
        if info.get("create_time") is None or info.get("status") == psutil.STATUS_ZOMBIE:
            continue  # unreadable, or already dead and only waiting to be reaped
        session = group = None
        if not IS_WINDOWS:
            with contextlib.suppress(OSError):
                session, group = os.getsid(info["pid"]), os.getpgid(info["pid"])
        found.append(ProcInfo(info["pid"], info.get("ppid") or 0, info["create_time"], session, group,
                              info.get("name") or "?"))
    return found


def _same(proc: ProcInfo, created: float) -> bool:
    return abs(proc.created - created) <= CREATE_TIME_TOLERANCE_S


def leftovers(record: TrainerRecord, procs: Iterable[ProcInfo], *, boot_time: float,
              me: int | None = None) -> list[ProcInfo]:
    """The processes of `record`'s trainer tree among `procs` (pure: the caller takes the snapshot)."""
    if not record.started or record.started + CREATE_TIME_TOLERANCE_S < boot_time:
        return []  # unknown start, or a trainer from before this boot: any match would be a stranger
    by_pid = {p.pid: p for p in procs if p.pid != me}
    known = {**record.descendants, record.pid: record.started}
    chosen = {pid: by_pid[pid] for pid, created in known.items() if pid in by_pid and _same(by_pid[pid], created)}
    after_start = [p for p in by_pid.values() if p.created >= record.started - CREATE_TIME_TOLERANCE_S]
    leader = by_pid.get(record.pid)
    if leader is None or _same(leader, record.started):
        chosen.update((p.pid, p) for p in after_start if p.session == record.pid)
    # Children of what we found (one that left the session with setsid, say), born after the trainer.
    grew = True
    while grew:
        grew = False
        for proc in after_start:
            if proc.pid not in chosen and proc.ppid in chosen:
                chosen[proc.pid] = proc
                grew = True
    return sorted(chosen.values(), key=lambda p: p.pid)


def kill_leftovers(record: TrainerRecord, grace_s: float = 3.0) -> list[ProcInfo]:
    """SIGTERM the trainer tree left by a dead daemon, then SIGKILL what remains. Returns what was found."""
    boot = psutil.boot_time()
    victims: dict[int, ProcInfo] = {}
    for _ in range(3):  # a member may fork while we kill: look again until nothing new turns up
        found = [p for p in leftovers(record, scan(), boot_time=boot, me=os.getpid()) if p.pid not in victims]
        if not found:
            break
        victims.update((p.pid, p) for p in found)
        _stop(found, grace_s)
        if not IS_WINDOWS and any(p.group == record.pid for p in found):
            # The group is the trainer's own (checked above): this also reaches a member born just now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)
    return sorted(victims.values(), key=lambda p: p.pid)


def _stop(found: list[ProcInfo], grace_s: float) -> None:
    procs: list[psutil.Process] = []
    for info in found:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(info.pid)
            if abs(proc.create_time() - info.created) <= CREATE_TIME_TOLERANCE_S:  # not reused since the scan
                procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)
