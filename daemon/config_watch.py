"""Live config reload: a watchdog observer on the config file's folder, debounced, applying valid edits.

The folder is watched, not the file: editors that save by writing a new file and renaming it over the old
one (vim, atomic writes) replace the inode a file watch would follow. Events arrive on watchdog's thread and
are handed to the event loop, where a burst of them (truncate, write, close, rename) becomes one reload once
the file has been quiet for DEBOUNCE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from daemon.config import Config, ConfigError, LiveConfig, reload_config

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.3


@dataclass(frozen=True)
class ConfigReport:
    """What one reload did; the payload of the `config` event (setting names only, never a value)."""

    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    error: str | None = None
    key: str | None = None  # the bad setting when `error` is set (None when the file itself is unreadable)

    def to_json(self) -> dict[str, Any]:
        return {"changed": list(self.changed), "restart_needed": list(self.restart_needed),
                "error": self.error, "key": self.key}


def error_report(path: Path, exc: ConfigError) -> ConfigReport:
    reason = " ".join(str(exc).split())  # YAML errors span lines; the event and the log get one
    return ConfigReport(error=f"The edit of {path.name} was not applied ({reason}); the daemon keeps running with "
                              "its previous settings.", key=None if exc.key == "(file)" else exc.key)


OnReload = Callable[[ConfigReport], Awaitable[None]]


class ConfigWatcher:
    """Re-reads `live.current.path` when it changes; a valid edit replaces `live.current` (host, port and
    data_dir keep their running values) and every outcome is logged and passed to `on_reload`."""

    def __init__(self, live: LiveConfig, path: Path, on_reload: OnReload, *, debounce_s: float = DEBOUNCE_S) -> None:
        self._live = live
        self._path = path
        self._on_reload = on_reload
        self._debounce_s = debounce_s
        self._last_file: Config = live.current
        self._failing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._again = False
        self._observer: BaseObserver | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        observer.schedule(_NameFilter(self._path.name, self._changed), str(self._path.parent), recursive=False)
        await asyncio.to_thread(observer.start)
        self._observer = observer
        log.info("watching %s: edits apply without a restart (host, port and data_dir need one)", self._path)
        # What the file says now is the baseline for "restart needed" (--host/--port may override it); an edit
        # made between the daemon reading the file and the watch starting is applied like any other.
        with contextlib.suppress(ConfigError):
            self._last_file = (await asyncio.to_thread(reload_config, self._path, self._live.current,
                                                       self._live.current)).file_config
        self._schedule()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 5)
        if self._reloading is not None:
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)

    def _changed(self) -> None:
        """On watchdog's thread."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the observer stopped
                self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self._observer is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._debounce_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._reloading is not None and not self._reloading.done():
            self._again = True  # read once more when this reload ends: the file changed while it was read
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        self._again = False
        try:
            report = await self._apply()
            if report is not None:
                await self._on_reload(report)
        except asyncio.CancelledError:
            raise
        except Exception:  # a reload must never end the watch
            log.exception("reloading %s failed", self._path)
        if self._again and self._observer is not None:
            self._schedule()

    async def _apply(self) -> ConfigReport | None:
        running = self._live.current
        try:
            result = await asyncio.to_thread(reload_config, self._path, running, self._last_file)
        except ConfigError as exc:
            report = error_report(self._path, exc)
            log.error("%s", report.error)
            self._failing = True
            return report
        self._last_file = result.file_config
        self._live.current = result.running
        was_failing, self._failing = self._failing, False
        if result.changed:
            log.info("config reloaded from %s: %s now in effect", self._path, ", ".join(result.changed))
        if result.restart_needed:
            log.warning("config: %s changed in %s; restart the daemon to apply (it keeps running with %s)",
                        ", ".join(result.restart_needed), self._path, _running_values(running, result.restart_needed))
        if not (result.changed or result.restart_needed or was_failing):
            return None  # saved without a change (or touched): nothing to say
        if was_failing and not (result.changed or result.restart_needed):
            log.info("config: %s is valid again; nothing changed", self._path)
        return ConfigReport(changed=result.changed, restart_needed=result.restart_needed)


def _running_values(config: Config, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys)


class _NameFilter(FileSystemEventHandler):
    """Calls `changed` for any event on the file named `name` in the watched folder, including a rename onto it."""

    def __init__(self, name: str, changed: Callable[[], None]) -> None:
        self._name = os.path.normcase(name)
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reading the file (the daemon's own reload among them) changes nothing
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(os.path.normcase(os.path.basename(os.fsdecode(p))) == self._name for p in paths if p):
            self._changed()
