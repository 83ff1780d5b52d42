"""Automatic tags for the pictures before a job: kohya's WD14 tagger run as a supervised subprocess."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
