"""EventHub: persists each event, then queues it for every connected WebSocket.

The pipeline never touches a socket: it calls `publish`. Each event is turned into JSON once (in the
worker thread that persists it) and queued as text for each subscriber, whose own sender task writes
it. A client that stops reading can never stall training or other clients: it is disconnected as soon
as one frame waits SEND_TIMEOUT_S to be written or its queue holds QUEUE_BYTES (it reconnects and gets
a fresh snapshot).

Persisting and queueing happen under one lock, and so does a new subscriber's snapshot: a client sees
each change exactly once, either in its snapshot or as an event after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, Protocol

from daemon.aio import within
from daemon.events import Event, EventType
from daemon.jobs.store import JobStore

log = logging.getLogger(__name__)

# Progress lives in the job row, log lines and loss points in their own tables; the history keeps the rest.
_NOT_IN_HISTORY = frozenset({EventType.PROGRESS, EventType.SNAPSHOT, EventType.JOB_DELETED, EventType.LOG,
                             EventType.LOSS})
QUEUE_BYTES = 8 * 1024 * 1024  # frames waiting for one subscriber (frames are ASCII JSON: chars = bytes)
SEND_TIMEOUT_S = 5.0  # one frame may wait this long for a subscriber's socket to take it


class Socket(Protocol):
    async def send_str(self, data: str) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


def encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame)  # ASCII (ensure_ascii), so len() is the size on the wire


class _Client:
    def __init__(self, socket: Socket, abort: Callable[[], None] | None,
                 on_stuck: Callable[[_Client, str], None]) -> None:
        self.socket = socket
        self.abort = abort
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued_bytes = 0
        self._on_stuck = on_stuck
        self.task: asyncio.Task[None] = asyncio.create_task(self._send())

    def offer(self, frame: str) -> bool:
        """Queue `frame`; False when that would pass QUEUE_BYTES (one frame alone always fits)."""
        if self.queued_bytes and self.queued_bytes + len(frame) > QUEUE_BYTES:
            return False
        self.queued_bytes += len(frame)
        self.queue.put_nowait(frame)
        return True

    async def _send(self) -> None:
        while True:
            frame = await self.queue.get()
            self.queued_bytes -= len(frame)
            try:
                await within(self.socket.send_str(frame), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._on_stuck(self, f"a frame waited {SEND_TIMEOUT_S:g} s to be sent")
                return
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

    async def subscribe(self, socket: Socket, abort: Callable[[], None] | None = None) -> None:
        """`abort` drops the connection at once (the transport's abort): a client that stopped reading
        cannot be closed politely, and its unsent bytes must not stay in memory."""
        async with self._lock:
            # The snapshot holds everything up to the last event's seq; the next event is seq + 1.
            frame = await asyncio.to_thread(self._snapshot, self._seq)
            client = _Client(socket, abort, self._drop)
            self._clients[socket] = client
            self._enqueue(client, frame)

    async def unsubscribe(self, socket: Socket) -> None:
        client = self._clients.pop(socket, None)
        if client is not None:
            client.task.cancel()
            await asyncio.gather(client.task, return_exceptions=True)

    async def publish(self, event: Event, persist: Callable[[], None] | None = None) -> None:
        """Run `persist` (blocking store writes) and queue `event`, atomically for subscribers."""
        async with self._lock:
            frame = await asyncio.to_thread(self._write, event, persist, self._seq + 1)
            self._seq += 1
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

    def _snapshot(self, seq: int) -> str:
        jobs = self._store.list()
        return encode(Event.now(EventType.SNAPSHOT, None, {"jobs": [j.to_json() for j in jobs]}).envelope(seq))

    def _write(self, event: Event, persist: Callable[[], None] | None, seq: int) -> str:
        if persist is not None:
            persist()
        if event.type not in _NOT_IN_HISTORY and event.job_id is not None:
            try:
                self._store.append_event(event)
            except sqlite3.IntegrityError:
                log.info("not recording %s for job %s: the job was deleted", event.type.value, event.job_id)
        return encode(event.envelope(seq))

    def _enqueue(self, client: _Client, frame: str) -> None:
        if not client.offer(frame):
            self._drop(client, f"{client.queued_bytes} bytes wait for it")

    def _drop(self, client: _Client, why: str) -> None:
        if self._clients.get(client.socket) is not client:
            return  # already gone
        log.warning("a WebSocket subscriber is not reading (%s); disconnecting it", why)
        del self._clients[client.socket]
        client.task.cancel()
        task = asyncio.create_task(_close_quietly(client.socket, client.abort))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _close_quietly(socket: Socket, abort: Callable[[], None] | None) -> None:
    # A polite close frame gets through to a client that is merely slow; then the connection is
    # aborted either way, dropping whatever is still buffered for it.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(socket.close(code=1008, message=b"too slow: reconnect for a fresh snapshot"), 1)
    if abort is not None:
        with contextlib.suppress(Exception):
            abort()
