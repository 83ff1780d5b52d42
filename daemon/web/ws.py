"""GET /ws: a snapshot of every job on connect, then every event as it is published."""

from __future__ import annotations

import logging

from aiohttp import WSMsgType, web

from daemon.web.keys import HUB

log = logging.getLogger(__name__)


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    hub = request.app[HUB]
    try:
        await hub.subscribe(ws)
        async for msg in ws:
            # The socket is one-way; reading only keeps the connection alive and notices the close.
            if msg.type == WSMsgType.ERROR:
                log.info("WebSocket closed with error: %s", ws.exception())
    finally:
        await hub.unsubscribe(ws)
    return ws
