"""EventHub: persists each event, then queues it for every connected WebSocket.

The pipeline never touches a socket: it calls `publish`. Each subscriber has its own bounded queue and
sender task, so a client that stops reading can never stall training or other clients: when its queue
is full it is disconnected (it reconnects and gets a fresh snapshot).

Persisting and queueing happen under one lock, and so does a new subscriber's snapshot: a client sees
each change exactly once, either in its snapshot or as an event after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, Protocol

from daemon.events import Event, EventType
from daemon.jobs.store import JobStore

log = logging.getLogger(__name__)

# Progress lives in the job row and log lines in their own table; the history keeps the rest.
_NOT_IN_HISTORY = frozenset({EventType.PROGRESS, EventType.SNAPSHOT, EventType.JOB_DELETED, EventType.LOG})
QUEUE_LIMIT = 2000


class Socket(Protocol):
    async def send_json(self, data: Any) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


class _Client:
    def __init__(self, socket: Socket) -> None:
        self.socket = socket
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=QUEUE_LIMIT)
        self.task: asyncio.Task[None] = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while (frame := await self.queue.get()) is not None:
            try:
                await self.socket.send_json(frame)
            except (ConnectionError, RuntimeError) as exc:
                log.info("a WebSocket subscriber went away: %s", exc)
                return


class EventHub:
    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._clients: dict[Socket, _Client] = {}
        self._seq = 0
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._clients)

    async def subscribe(self, socket: Socket) -> None:
        async with self._lock:
            jobs = await asyncio.to_thread(self._store.list)
            client = _Client(socket)
            self._clients[socket] = client
            # The snapshot holds everything up to the last event's seq; the next event is seq + 1.
            snapshot = Event.now(EventType.SNAPSHOT, None, {"jobs": [j.to_json() for j in jobs]})
            self._enqueue(client, snapshot.envelope(self._seq))

    async def unsubscribe(self, socket: Socket) -> None:
        client = self._clients.pop(socket, None)
        if client is not None:
            client.task.cancel()
            await asyncio.gather(client.task, return_exceptions=True)

    async def publish(self, event: Event, persist: Callable[[], None] | None = None) -> None:
        """Run `persist` (blocking store writes) and queue `event`, atomically for subscribers."""
        async with self._lock:
            await asyncio.to_thread(self._write, event, persist)
            self._seq += 1
            frame = event.envelope(self._seq)
            for client in list(self._clients.values()):
                self._enqueue(client, frame)

    async def emit(self, type: EventType, job_id: str | None, data: dict[str, Any],
                   persist: Callable[[], None] | None = None) -> None:
        await self.publish(Event.now(type, job_id, data), persist)

    async def close_all(self, close: Callable[[Socket], Any]) -> None:
        for socket in list(self._clients):
            await self.unsubscribe(socket)
            with contextlib.suppress(Exception):
                await close(socket)

    def _write(self, event: Event, persist: Callable[[], None] | None) -> None:
        if persist is not None:
            persist()
        if event.type not in _NOT_IN_HISTORY and event.job_id is not None:
            try:
                self._store.append_event(event)
            except sqlite3.IntegrityError:
                log.info("not recording %s for job %s: the job was deleted", event.type.value, event.job_id)

    def _enqueue(self, client: _Client, frame: dict[str, Any]) -> None:
        try:
            client.queue.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("a WebSocket subscriber is not reading; disconnecting it")
            self._clients.pop(client.socket, None)
            client.task.cancel()
            task = asyncio.create_task(_close_quietly(client.socket))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


async def _close_quietly(socket: Socket) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(socket.close(code=1008, message=b"too slow: reconnect for a fresh snapshot"), 5)
