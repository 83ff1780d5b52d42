"""Preview pictures: kohya writes them into <output>/sample; each finished one is reported once.

watchdog tells us when a file appears; a file is reported only once it decodes completely (kohya may
still be writing it), and a last scan at the end catches anything an event missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from PIL import Image
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

SAMPLE_SUFFIX = ".png"
_COMPLETE_TRIES = 40
_COMPLETE_DELAY_S = 0.1


def is_complete_png(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


class _Handler(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Path]) -> None:
        self._loop = loop
        self._queue = queue

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "modified", "closed"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(raw.decode() if isinstance(raw, bytes) else raw)
        if path.suffix.lower() == SAMPLE_SUFFIX:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, path)


class SampleWatcher:
    def __init__(self, folder: Path, on_sample: Callable[[Path], Awaitable[None]]) -> None:
        self.folder = folder
        self._on_sample = on_sample
        self._seen: set[str] = set()
        self._queue: asyncio.Queue[Path | None] = asyncio.Queue()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._consume())
        observer = Observer()
        observer.daemon = True
        try:
            observer.schedule(_Handler(asyncio.get_running_loop(), self._queue), str(self.folder), recursive=False)
            await asyncio.to_thread(observer.start)
        except OSError as exc:
            # e.g. Linux out of inotify watches: previews then arrive with the final scan, not live
            log.warning("cannot watch %s for preview pictures (%s); they will be listed at the end", self.folder, exc)
            return
        self._observer = observer

    async def stop(self) -> None:
        """Stop watching, then report whatever is in the folder and was not reported yet."""
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)
            self._observer = None
        if self._task is not None:
            self._queue.put_nowait(None)  # the consumer finishes the picture in hand, then ends
            (outcome,) = await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            if isinstance(outcome, Exception):
                log.warning("reporting a preview picture failed: %s", outcome)
        for path in sorted(self.folder.glob(f"*{SAMPLE_SUFFIX}")):
            await self._report(path, tries=1)

    async def _consume(self) -> None:
        while (path := await self._queue.get()) is not None:
            await self._report(path, tries=_COMPLETE_TRIES)

    async def _report(self, path: Path, *, tries: int) -> None:
        if path.name in self._seen or path.parent != self.folder:
            return
        for attempt in range(tries):
            if await asyncio.to_thread(is_complete_png, path):
                self._seen.add(path.name)
                await self._on_sample(path)
                return
            if attempt + 1 < tries:
                await asyncio.sleep(_COMPLETE_DELAY_S)
        log.debug("sample %s never became a complete PNG", path)
