"""Checks on the pictures before a job (warnings, never blocking) and the face crop preview."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
