"""GET /ws: a snapshot of every job on connect, then every event as it is published."""

from __future__ import annotations

import logging

from aiohttp import WSCloseCode, WSMsgType, web

from daemon.web.keys import HUB

log = logging.getLogger(__name__)

# A ping every HEARTBEAT_S while the client is quiet; no pong within half of it and the connection is
# closed (a dead peer costs nothing else: one that stops reading while events flow is dropped by the
# hub's send timeout or byte cap). Browsers answer pings themselves, even for a tab in the background.
HEARTBEAT_S = 10.0


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S)
    await ws.prepare(request)
    hub = request.app[HUB]
    transport = request.transport
    try:
        await hub.subscribe(ws, abort=transport.abort if transport is not None else None)
        async for msg in ws:
            # The socket is one-way; reading only keeps the connection alive and notices the close.
            if msg.type == WSMsgType.ERROR:
                log.info("WebSocket closed with error: %s", ws.exception())
    finally:
        await hub.unsubscribe(ws)
        if ws.close_code == WSCloseCode.ABNORMAL_CLOSURE and transport is not None:
            transport.abort()  # a peer that stopped answering: drop what is still buffered for it
    return ws
