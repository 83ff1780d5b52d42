"""One daemon per data dir: a second one would take the first one's running job for a crashed one."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

from daemon.errors import DaemonError


class AlreadyRunning(DaemonError):
    pass


class InstanceLock:
    """An OS-level exclusive lock on `<data_dir>/daemon.lock`, released by the OS if the process dies."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "daemon.lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        try:
            if sys.platform == "win32":
                import msvcrt

                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            raise AlreadyRunning(
                f"Another daemon is already running with the data folder {self.path.parent}.",
                hint="Use that one (it may have been started by Easy Diffusion), or stop it first.",
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            if sys.platform == "win32":
                import msvcrt

                # Windows frees a lock left to close() only "after a delay": a quick restart would fail.
                self._fh.seek(0)
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_UNLCK, 1)
            self._fh.close()  # on POSIX closing the file drops the lock
            self._fh = None
