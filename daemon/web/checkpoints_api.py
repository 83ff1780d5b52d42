"""A job's saved epochs: list them with their previews and loss, publish one into ED's LoRA folder."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
