"""EventHub: persists each event, then sends it to every connected WebSocket.

The pipeline never touches a socket: it calls `publish`. A socket that fails to take a frame is
dropped and logged; the others still get it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from daemon.events import Event, EventType
from daemon.jobs.store import JobStore

log = logging.getLogger(__name__)

# Progress is persisted in the job row; the history keeps everything else (and ever-changing progress
# would bloat it).
_NOT_IN_HISTORY = frozenset({EventType.PROGRESS, EventType.SNAPSHOT, EventType.JOB_DELETED})


class Subscriber(Protocol):
    async def send_json(self, data: Any) -> None: ...


class EventHub:
    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._subscribers: set[Subscriber] = set()
        self._seq = 0
        self._lock = asyncio.Lock()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, sub: Subscriber) -> None:
        """Register `sub` and send it the snapshot, with nothing published in between."""
        async with self._lock:
            jobs = await asyncio.to_thread(self._store.list)
            snapshot = Event.now(EventType.SNAPSHOT, None, {"jobs": [j.to_json() for j in jobs]})
            self._seq += 1
            await sub.send_json(snapshot.envelope(self._seq))
            self._subscribers.add(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    async def publish(self, event: Event) -> None:
        async with self._lock:
            if event.type not in _NOT_IN_HISTORY and event.job_id is not None:
                await asyncio.to_thread(self._store.append_event, event)
            self._seq += 1
            frame = event.envelope(self._seq)
            for sub in list(self._subscribers):
                try:
                    await sub.send_json(frame)
                except (ConnectionError, RuntimeError) as exc:
                    log.info("dropping a WebSocket subscriber that failed to receive: %s", exc)
                    self._subscribers.discard(sub)

    async def emit(self, type: EventType, job_id: str | None, data: dict[str, Any]) -> None:
        await self.publish(Event.now(type, job_id, data))
